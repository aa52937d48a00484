"""Data formats: every layout and container reads into the same training examples as `messages`; bad rows are
reported by file and row; embedded images become cached files; reading never decodes an image."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from vlmtune import families
from vlmtune.config import RecipeError, load_recipe
from vlmtune.data.formats import FORMATS, RowProblem, read_rows, reader_options
from vlmtune.data.formatting import Formatter
from vlmtune.data.images import image_size
from vlmtune.data.prepare import prepare

from .conftest import write_jsonl

TEMPLATES = Path(__file__).resolve().parents[1] / "data_templates"
IMAGES = TEMPLATES / "shapes" / "images"
VQA_COLUMNS = {"image": "img", "question": "q", "answer": "a"}
PNG = (IMAGES / "train_0002.png").read_bytes()
DATA_URI = "data:image/png;base64," + base64.b64encode(PNG).decode()


def sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def to_examples(processor_for):
    """Conversations -> (input_ids, labels, image contents) as training sees them, on the tiny Qwen2-VL."""
    family, processor = families.get("qwen2_vl"), processor_for("qwen2_vl")
    formatter = Formatter(family, processor)

    def run(items) -> list[tuple]:
        items = list(items)
        assert not [x for x in items if isinstance(x, RowProblem)], items
        out = []
        for conv in items:
            sizes = [(h, w) for w, h in map(image_size, map(Path, conv.images))]
            f = formatter(conv, [p.text for p in family.plan_images(processor, sizes)] if sizes else [])
            out.append((f.input_ids, f.labels, [sha(p) for p in conv.images]))
        return out

    return run


def messages_rows(pairs) -> list[dict]:
    """(image path relative to data_templates, question, answer) -> the same sample in `messages` form."""
    return [{"messages": [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": q}]},
                          {"role": "assistant", "content": [{"type": "text", "text": a}]}]} for img, q, a in pairs]


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def reference(to_examples):
    return to_examples(read_rows(TEMPLATES / "messages-example.jsonl", "messages"))


# --- round trips: each shipped example == the same conversations written as `messages` ----------------------------

@pytest.mark.parametrize("name, fmt", [("llava-example.json", "llava"), ("sharegpt-example.jsonl", "sharegpt")])
def test_chat_examples_equal_the_messages_example(name, fmt, to_examples, reference):
    assert len(reference) == 3
    assert to_examples(read_rows(TEMPLATES / name, fmt)) == reference


def test_llava_jsonl_equals_llava_json(tmp_path, to_examples, reference):
    items = json.loads((TEMPLATES / "llava-example.json").read_text())
    path = write_jsonl(tmp_path / "llava.jsonl", items)
    assert to_examples(read_rows(path, "llava", image_root=str(TEMPLATES))) == reference


def vqa_as_messages(tmp_path) -> list:
    rows = [(r["image"], r["question"], r["answer"]) for r in jsonl_rows(TEMPLATES / "vqa-example.jsonl")]
    return list(read_rows(write_jsonl(tmp_path / "m.jsonl", messages_rows(rows)), "messages", str(TEMPLATES)))


def test_vqa_example_equals_messages(tmp_path, to_examples):
    assert to_examples(read_rows(TEMPLATES / "vqa-example.jsonl", "vqa")) == to_examples(vqa_as_messages(tmp_path))


@pytest.mark.parametrize("prompt", [None, "What is in the picture?"])
def test_caption_example_equals_messages_with_the_recipe_prompt(tmp_path, to_examples, prompt):
    rows = jsonl_rows(TEMPLATES / "caption-example.jsonl")
    as_messages = messages_rows((r["image"], prompt or "Describe this image.", r["caption"]) for r in rows)
    expected = read_rows(write_jsonl(tmp_path / "m.jsonl", as_messages), "messages", str(TEMPLATES))
    got = read_rows(TEMPLATES / "caption-example.jsonl", "caption", **({"caption_prompt": prompt} if prompt else {}))
    assert to_examples(got) == to_examples(expected)


def test_parquet_example_with_embedded_bytes_and_columns_equals_messages(tmp_path, to_examples):
    got = list(read_rows(TEMPLATES / "vqa-example.parquet", "vqa", columns=VQA_COLUMNS))
    assert to_examples(got) == to_examples(vqa_as_messages(tmp_path))
    assert all(Path(p).parent.name == "images" and Path(p).stem == sha(p) for c in got for p in c.images)


def image_feature_dataset(rows: dict, image_features: dict):
    """A `datasets.Dataset` whose image columns have datasets' Image feature (stored as {"bytes", "path"})."""
    import datasets

    ds = datasets.Dataset.from_dict(rows)
    for col, many in image_features.items():
        ds = ds.cast_column(col, datasets.List(datasets.Image()) if many else datasets.Image())
    return ds


def test_datasets_folder_vqa_layout_equals_messages(tmp_path, to_examples):
    rows = jsonl_rows(TEMPLATES / "vqa-example.jsonl")
    ds = image_feature_dataset({"img": [{"bytes": (TEMPLATES / r["image"]).read_bytes(), "path": None} for r in rows],
                                "q": [r["question"] for r in rows], "a": [r["answer"] for r in rows]}, {"img": False})
    ds.save_to_disk(tmp_path / "ds")
    got = read_rows(tmp_path / "ds", "vqa", columns=VQA_COLUMNS)
    assert to_examples(got) == to_examples(vqa_as_messages(tmp_path))


def test_datasets_folder_messages_with_an_images_column_equals_messages(tmp_path, to_examples, reference):
    """The common Hub layout: image parts without a path, images in their own column, in order."""
    convs, pics = [], []
    for row in jsonl_rows(TEMPLATES / "messages-example.jsonl"):
        images = []
        for msg in row["messages"]:
            for part in msg["content"]:
                if part["type"] == "image":
                    images.append(str(TEMPLATES / part.pop("image")))  # a path; datasets stores it as one
        convs.append(row["messages"])
        pics.append(images)
    image_feature_dataset({"conv": convs, "pics": pics}, {"pics": True}).save_to_disk(tmp_path / "ds")
    assert to_examples(read_rows(tmp_path / "ds", "messages", columns={"messages": "conv", "images": "pics"})) == reference


def test_sharegpt_parquet_with_relative_paths_and_columns(tmp_path, to_examples, reference):
    rows = jsonl_rows(TEMPLATES / "sharegpt-example.jsonl")
    table = pa.table({"conv": [r.get("messages") or [{"role": m["from"], "content": m["value"]}
                                                        for m in r["conversations"]] for r in rows],
                      "pics": [r["images"] for r in rows]})
    pq.write_table(table, tmp_path / "s.parquet")
    got = read_rows(tmp_path / "s.parquet", "sharegpt", str(TEMPLATES), columns={"messages": "conv", "images": "pics"})
    assert to_examples(got) == reference


def test_prepare_passes_the_recipe_options_to_the_reader(processor_for):
    family, processor = families.get("qwen2_vl"), processor_for("qwen2_vl")

    class Data:
        caption_prompt, columns, allow_urls = "Caption it.", VQA_COLUMNS, False

    data = prepare(TEMPLATES / "vqa-example.parquet", "vqa", None, Formatter(family, processor), family, 4096,
                   read_options=reader_options(Data))
    assert (data.rows, len(data.examples), data.problems) == (3, 3, [])
    Data.columns = {}
    data = prepare(TEMPLATES / "caption-example.jsonl", "caption", None, Formatter(family, processor), family, 4096,
                   read_options=reader_options(Data))
    assert "Caption it." in processor.tokenizer.decode(data.examples[0].input_ids)


# --- LLaVA / ShareGPT `<image>` tag rules ---------------------------------------------------------------------------

def llava(image="shapes/images/train_0002.png", value="<image>\nWhich shape?", reply="A.", role="human", **extra):
    return {"image": image, "conversations": [{"from": role, "value": value}, {"from": "gpt", "value": reply}], **extra}


def parts_of(path, fmt, **kw):
    (conv,) = read_rows(path, fmt, **kw)
    return [[(p.type, p.text or Path(p.image).name) for p in t.parts] for t in conv.turns]


def test_one_image_without_a_tag_goes_first_in_the_first_user_turn(tmp_path):
    tagged = parts_of(write_jsonl(tmp_path / "a.jsonl", [llava()]), "llava")
    untagged = parts_of(write_jsonl(tmp_path / "b.jsonl", [llava(value="Which shape?")]), "llava")
    assert untagged == tagged == [[("image", "train_0002.png"), ("text", "Which shape?")], [("text", "A.")]]


def test_a_tag_takes_one_newline_with_it_and_keeps_its_place(tmp_path):
    row = llava(image=["shapes/images/train_0002.png", "shapes/images/train_0003.png"],
                value="First:\n<image>\nthen <image> here.\n\nOK?")
    assert parts_of(write_jsonl(tmp_path / "a.jsonl", [row]), "llava", image_root=str(TEMPLATES))[0] == [
        ("text", "First:\n"), ("image", "train_0002.png"), ("text", "then "), ("image", "train_0003.png"),
        ("text", " here.\n\nOK?")]


def test_text_only_rows_are_allowed(tmp_path):
    assert parts_of(write_jsonl(tmp_path / "a.jsonl", [llava(image=None, value="Hi")]), "llava") == [
        [("text", "Hi")], [("text", "A.")]]


# --- broken rows: each a RowProblem naming file and row --------------------------------------------------------

def sharegpt(images=("shapes/images/train_0002.png",), content="<image>Which?", reply="A.", role="user", key="messages"):
    return {key: [{"role": role, "content": content}, {"role": "assistant", "content": reply}], "images": list(images)}


def messages(image="shapes/images/train_0002.png", reply="A.", role="user", **extra):
    return {"messages": [{"role": role, "content": [{"type": "image", "image": image}, {"type": "text", "text": "Q?"}]},
                         {"role": "assistant", "content": reply}], **extra}


def prompt_completion(images=("shapes/images/train_0002.png",), reply="A.", role="user"):
    return {"prompt": [{"role": role, "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}],
            "completion": [{"role": "assistant", "content": reply}], "images": list(images)}


def alpaca(**kw):
    return {k: v for k, v in {"instruction": "<image>Q?", "output": "A.", "images": ["shapes/images/train_0002.png"],
                              **kw}.items() if v is not ...}


def vqa(**kw):
    return {k: v for k, v in {"image": "shapes/images/train_0002.png", "question": "Q?", "answer": "A.", **kw}.items()
            if v is not ...}


def caption(**kw):
    return {k: v for k, v in {"image": "shapes/images/train_0002.png", "caption": "A.", **kw}.items() if v is not ...}


BAD_B64 = "data:image/png;base64,iVBORw0KGgo@@@"
URL = "https://example.com/cat.png"
NOT_IMAGE = "data:image/png;base64," + base64.b64encode(b"hello, not an image").decode()
BAD_ROWS = {
    "messages": [
        (messages(role="robot"), "message 0: unknown role 'robot'"),
        (messages(reply=" "), "message 1: the assistant reply is empty"),
        (messages(image=BAD_B64), "message 0 part 0: image data URI is not valid base64"),
        (messages(image=NOT_IMAGE), "is not PNG, JPEG, GIF, WebP, BMP or TIFF data"),
        (messages(image=URL), "set data.allow_urls: true"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]},
                       {"role": "assistant", "content": "x"}], "images": ["shapes/images/train_0002.png"]},
         'message 0 part 1: an image part without its own image, but "images" has no image 1 (1 given)'),
        ({"conversations": []}, 'expected an object with a "messages" list'),
    ],
    "llava": [
        (llava(role="robot"), "message 0: unknown role 'robot' (expected human/user, gpt/assistant or system)"),
        (llava(reply=""), "message 1: the assistant reply is empty"),
        (llava(value="<image><image>Two?"), '2 <image> placeholders in the text but 1 image in "image"'),
        (llava(image=["shapes/images/train_0002.png"] * 2, value="No tags"), '0 <image> placeholders in the text but 2'),
        (llava(image=BAD_B64), "image: image data URI is not valid base64"),
        (llava(image=URL), "set data.allow_urls: true"),
        ({"image": "x.png"}, 'missing "conversations"'),
    ],
    "sharegpt": [
        (sharegpt(role="bot"), "message 0: unknown role 'bot'"),
        (sharegpt(reply="\n"), "message 1: the assistant reply is empty"),
        (sharegpt(images=()), '1 <image> placeholder in the text but 0 images in "images"'),
        (sharegpt(images=[BAD_B64]), "images: image data URI is not valid base64"),
        (sharegpt(images=[URL], key="conversations"), "set data.allow_urls: true"),
        ({"images": []}, 'missing "messages" (or "conversations")'),
    ],
    "vqa": [
        (vqa(answer=""), '"answer" is empty'),
        (vqa(image=BAD_B64), "image: image data URI is not valid base64"),
        (vqa(image=URL), "set data.allow_urls: true"),
        (vqa(image=...), 'missing "image"'),
        (vqa(question=...), 'missing "question"'),
        (vqa(answer=7), '"answer" must be a string'),
    ],
    "caption": [
        (caption(caption=" "), '"caption" is empty'),
        (caption(image=BAD_B64), "image: image data URI is not valid base64"),
        (caption(image=URL), "set data.allow_urls: true"),
        (caption(image=...), 'missing "image"'),
        (caption(caption=...), 'missing "caption"'),
    ],
    "prompt_completion": [
        (prompt_completion(role="robot"), "prompt message 0: unknown role 'robot'"),
        (prompt_completion(reply=" "), "completion message 0: the assistant reply is empty"),
        (prompt_completion(images=[BAD_B64]), "images: image data URI is not valid base64"),
        (prompt_completion(images=[URL]), "set data.allow_urls: true"),
        ({"completion": "A."}, 'missing "prompt"'),
    ],
    "alpaca": [
        (alpaca(output=" "), '"output" is empty'),
        (alpaca(instruction="<image><image>Two?"), '2 <image> placeholders in the text but 1 image in "images"'),
        (alpaca(images=[BAD_B64]), "images: image data URI is not valid base64"),
        (alpaca(images=[URL]), "set data.allow_urls: true"),
        (alpaca(instruction=...), 'missing "instruction"'),
        (alpaca(history="q"), '"history" must be a list of [question, answer] pairs'),
    ],
}
GOOD = {"messages": messages(), "llava": llava(), "sharegpt": sharegpt(), "vqa": vqa(), "caption": caption(),
        "prompt_completion": prompt_completion(), "alpaca": alpaca()}
CASES = [(fmt, row, msg) for fmt, cases in BAD_ROWS.items() for row, msg in cases]


def problems_of(path, fmt, **kw) -> tuple[list[RowProblem], int]:
    items = list(read_rows(path, fmt, **kw))
    return [x for x in items if isinstance(x, RowProblem)], sum(not isinstance(x, RowProblem) for x in items)


@pytest.mark.parametrize("fmt, row, expected", CASES, ids=[f"{f}-{m[:28]}" for f, _, m in CASES])
def test_bad_row_in_jsonl_names_file_and_line(tmp_path, fmt, row, expected):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD[fmt], "", row, GOOD[fmt]])
    problems, good = problems_of(path, fmt, image_root=str(TEMPLATES))
    assert good == 2 and len(problems) == 1, problems
    assert (problems[0].file, problems[0].row) == (str(path), 3) and expected in problems[0].message
    assert str(problems[0]).startswith(f"{path}:3: ")


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_item_in_a_json_array_names_the_item(tmp_path, fmt):
    row, expected = BAD_ROWS[fmt][0]
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD[fmt], row, GOOD[fmt]], indent=1))
    (problem,), good = problems_of(path, fmt, image_root=str(TEMPLATES))
    assert good == 2 and problem.row == 2 and problem.message.startswith("item 2: ") and expected in problem.message


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_image_file_is_a_problem_at_its_row(tmp_path, fmt, processor_for):
    family = families.get("qwen2_vl")
    bad = {"messages": messages(image="nope.png"), "llava": llava(image="nope.png"),
           "sharegpt": sharegpt(images=["nope.png"]), "vqa": vqa(image="nope.png"), "caption": caption(image="nope.png"),
           "prompt_completion": prompt_completion(images=["nope.png"]), "alpaca": alpaca(images=["nope.png"])}
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD[fmt], bad[fmt]])
    data = prepare(path, fmt, str(TEMPLATES), Formatter(family, processor_for("qwen2_vl")), family, 4096)
    assert len(data.examples) == 1 and [(p.file, p.row) for p in data.problems] == [(str(path), 2)]
    assert "image not found" in data.problems[0].message and "nope.png" in data.problems[0].message


def test_invalid_json_lines_and_arrays(tmp_path):
    (problem,), good = problems_of(write_jsonl(tmp_path / "a.jsonl", [llava(), "{oops", llava()]), "llava",
                                   image_root=str(TEMPLATES))
    assert good == 2 and problem.row == 2 and "not valid JSON" in problem.message
    (tmp_path / "b.json").write_text('[\n{"image": "x.png"},\n{oops}\n]')
    (problem,), good = problems_of(tmp_path / "b.json", "llava")
    assert good == 0 and problem.row == 3 and "not valid JSON" in problem.message


def test_table_missing_a_mapped_column_is_one_problem(tmp_path):
    problems, good = problems_of(TEMPLATES / "vqa-example.parquet", "vqa", columns={**VQA_COLUMNS, "question": "query"})
    assert good == 0 and [(p.file, p.row) for p in problems] == [(str(TEMPLATES / "vqa-example.parquet"), 1)]
    assert 'column "query" (for "question") is not in the Parquet file' in problems[0].message
    assert "its columns are: img, q, a" in problems[0].message
    problems, _ = problems_of(TEMPLATES / "vqa-example.parquet", "vqa")
    assert 'column "image" (for "image")' in problems[0].message and "columns: {image: <column>}" in problems[0].message


def test_table_null_cells_are_problems_at_their_row(tmp_path):
    table = pq.read_table(TEMPLATES / "vqa-example.parquet").to_pylist()
    table[1]["img"] = None
    table[2]["a"] = ""
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "t.parquet")
    problems, good = problems_of(tmp_path / "t.parquet", "vqa", columns=VQA_COLUMNS)
    assert good == 1 and [(p.row, p.message) for p in problems] == [
        (2, 'row 2: missing "image" (column "img")'), (3, 'row 3: "answer" (column "a") is empty: there is nothing to train on')]


def test_jsonl_row_missing_a_mapped_key(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"img": "shapes/images/train_0002.png", "q": "Q?", "a": "A."},
                                               {"img": "shapes/images/train_0002.png", "a": "A."}])
    (problem,), good = problems_of(path, "vqa", image_root=str(TEMPLATES), columns=VQA_COLUMNS)
    assert good == 1 and problem.row == 2 and problem.message == 'missing column "q" (data.columns.question)'


def test_a_dataset_folder_with_splits_names_them(tmp_path):
    import datasets

    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"q": ["x"]})})
    ds.save_to_disk(tmp_path / "dd")
    (problem,), _ = problems_of(tmp_path / "dd", "vqa")
    assert "holds several splits" in problem.message and str(tmp_path / "dd" / "train") in problem.message


# --- image references -------------------------------------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VLMTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "images"


def test_absolute_paths_inside_image_root_only(tmp_path):
    inside, outside = str(IMAGES / "train_0002.png"), str(tmp_path / "elsewhere.png")
    path = write_jsonl(tmp_path / "a.jsonl", [vqa(image=inside), vqa(image=outside)])
    problems, good = problems_of(path, "vqa", image_root=str(TEMPLATES))
    assert good == 1 and [p.row for p in problems] == [2] and "is outside data.image_root" in problems[0].message
    problems, good = problems_of(path, "vqa")  # no image_root: absolute paths are used as they are
    assert (problems, good) == ([], 2)


def test_relative_paths_resolve_against_the_data_file_else_image_root(tmp_path):
    conv = next(read_rows(TEMPLATES / "vqa-example.jsonl", "vqa"))
    assert conv.images == [str(IMAGES / "train_0002.png")]
    path = write_jsonl(tmp_path / "a.jsonl", [vqa(image="images/train_0002.png")])
    (conv,) = read_rows(path, "vqa", image_root=str(TEMPLATES / "shapes"))
    assert conv.images == [str(IMAGES / "train_0002.png")]


def test_data_uris_and_bytes_are_cached_once_by_content(tmp_path, cache):
    path = write_jsonl(tmp_path / "a.jsonl", [vqa(image=DATA_URI), vqa(image=DATA_URI)])
    convs = list(read_rows(path, "vqa"))
    expected = cache / f"{hashlib.sha256(PNG).hexdigest()}.png"
    assert [c.images for c in convs] == [[str(expected)]] * 2
    assert expected.read_bytes() == PNG and len(list(cache.iterdir())) == 1
    pq.write_table(pa.table({"image": [PNG], "question": ["Q?"], "answer": ["A."]}), tmp_path / "raw.parquet")
    (conv,) = read_rows(tmp_path / "raw.parquet", "vqa")  # a plain binary column
    assert conv.images == [str(expected)] and len(list(cache.iterdir())) == 1


class _Server:
    def __init__(self, root: Path):
        self.hits = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=str(root), **k)

            def do_GET(self):  # noqa: N802
                server.hits.append(self.path)
                super().do_GET()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = _Server(IMAGES)
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def test_urls_download_once_into_the_cache_when_allowed(tmp_path, cache, server):
    url = f"{server.url}/train_0002.png"
    path = write_jsonl(tmp_path / "a.jsonl", [vqa(image=url), vqa(image=f"{server.url}/missing.png")])
    problems, _ = problems_of(path, "vqa")
    assert "set data.allow_urls: true" in problems[0].message and server.hits == []
    for _ in range(2):
        items = list(read_rows(path, "vqa", allow_urls=True))
        assert items[0].images == [str(cache / f"{hashlib.sha256(PNG).hexdigest()}.png")]
        assert isinstance(items[1], RowProblem) and "HTTP 404" in items[1].message and items[1].row == 2
    assert server.hits.count("/train_0002.png") == 1  # the second read used the cache


def test_unreachable_urls_say_so_and_fail_fast(tmp_path, cache):
    path = write_jsonl(tmp_path / "a.jsonl", [vqa(image="http://127.0.0.1:9/a.png"), vqa(image="http://127.0.0.1:9/b.png")])
    problems, good = problems_of(path, "vqa", allow_urls=True)
    assert good == 0 and [p.row for p in problems] == [1, 2]
    assert "could not download http://127.0.0.1:9/a.png" in problems[0].message and "offline" in problems[0].message
    assert "as for an earlier image" in problems[1].message


# --- scale: reading never decodes (or even opens) an image ----------------------------------------------------------

def test_reading_10000_rows_opens_no_image(tmp_path, cache, monkeypatch):
    from PIL import Image

    n = 10_000
    pngs = [p.read_bytes() for p in sorted(IMAGES.glob("train_00[0-4]?.png"))]
    write_jsonl(tmp_path / "a.jsonl", [llava(image=f"shapes/images/train_{i % 50 + 1:04d}.png") for i in range(n)])
    pq.write_table(pa.table({"img": [{"bytes": pngs[i % len(pngs)], "path": None} for i in range(n)],
                             "q": ["Q?"] * n, "a": ["A."] * n}), tmp_path / "b.parquet")

    def refuse(*a, **k):
        raise AssertionError("an image was opened while reading rows")

    monkeypatch.setattr(Image, "open", refuse)
    monkeypatch.setattr(Image.Image, "load", refuse)
    start = time.perf_counter()
    a = list(read_rows(tmp_path / "a.jsonl", "llava", image_root=str(TEMPLATES)))
    b = list(read_rows(tmp_path / "b.parquet", "vqa", columns=VQA_COLUMNS))
    elapsed = time.perf_counter() - start
    assert len(a) == len(b) == n and not [x for x in a + b if isinstance(x, RowProblem)]
    assert len(list(cache.iterdir())) == len(pngs)
    print(f"read 2 x {n} rows in {elapsed:.2f}s")


# --- recipe fields ---------------------------------------------------------------------------------------------------

def write_recipe(tmp_path, **data) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump({"model": {"name_or_path": "m/x"}, "data": data}))
    return p


def test_recipe_accepts_every_format_columns_and_a_dataset_folder(tmp_path):
    (tmp_path / "ds").mkdir()
    r = load_recipe(write_recipe(tmp_path, train="ds", format="vqa", columns=VQA_COLUMNS, allow_urls=True,
                                 caption_prompt="Say what you see."))
    assert r.data.columns == VQA_COLUMNS and r.data.allow_urls and r.data.caption_prompt == "Say what you see."
    assert reader_options(r.data).items() >= {"caption_prompt": "Say what you see.", "columns": VQA_COLUMNS,
                                              "allow_urls": True}.items()
    assert load_recipe(write_recipe(tmp_path, train="ds")).data.columns == {}
    assert set(FORMATS) == {"messages", "llava", "sharegpt", "vqa", "caption", "prompt_completion", "alpaca"}


@pytest.mark.parametrize("data, expected", [
    ({"format": "openai"}, "data.format: must be one of messages, llava, sharegpt, vqa, caption, prompt_completion, "
                           "alpaca"),
    ({"format": "vqa", "columns": {"img": "image"}}, "data.columns.img: is not a field of format vqa; its fields: "
                                                     "image, question, answer"),
    ({"columns": "img"}, "data.columns: must map field names to column names"),
    ({"allow_urls": "yes"}, "data.allow_urls: must be true or false"),
])
def test_recipe_data_field_errors(tmp_path, data, expected):
    (tmp_path / "t.jsonl").write_text("{}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path, train="t.jsonl", **data))
    assert expected in str(e.value)


def test_image_parts_with_and_without_an_index_take_each_image_once(tmp_path):
    from PIL import Image

    from vlmtune.data.formats import read_rows

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image", "index": 1}, {"type": "image"}]},
                      {"role": "assistant", "content": "x"}], "images": ["a.png", "b.png"]},
        {"messages": [{"role": "user", "content": [{"type": "image", "index": 0}, {"type": "image", "index": 0}]},
                      {"role": "assistant", "content": "x"}], "images": ["a.png", "b.png"]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second = list(read_rows(path, "messages", None))
    assert [Path(p).name for p in first.images] == ["b.png", "a.png"]
    assert "image 0 of \"images\" is used twice" in second.message


def test_a_line_that_is_not_utf8_is_that_rows_problem_only(tmp_path):
    from vlmtune.data.formats import RowProblem, read_rows

    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    path = tmp_path / "d.jsonl"
    path.write_bytes(good.encode() + b"\n" + good.replace("q", "caf\xe9").encode("latin-1") + b"\n" + good.encode())
    out = list(read_rows(path, "messages", None))
    assert [isinstance(o, RowProblem) for o in out] == [False, True, False]
    assert out[1].row == 2 and "not UTF-8" in out[1].message
