"""Peers' data read as it is: TRL's prompt/completion layout, Alpaca rows, and LLaMA-Factory datasets named in their
dataset_info.json (`data.train: dir/dataset_info.json#name`), each from a small file in the peer's documented
structure, read into the same training examples as the equivalent `messages` rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmtune.config import RecipeError, load_recipe
from vlmtune.data.formats import RowProblem, read_rows
from vlmtune.data.readers.llamafactory import DEFAULT_COLUMNS
from vlmtune.inference import read_prompts

from .conftest import write_jsonl
from .test_cli import recipe, run
from .test_formats import IMAGES, TEMPLATES, jsonl_rows, reference, to_examples  # noqa: F401 (fixtures)

SKY = "shapes/images/train_0002.png"


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    return path


def as_messages(tmp_path: Path, *rows: dict, name: str = "m.jsonl") -> list:
    return list(read_rows(write_jsonl(tmp_path / name, list(rows)), "messages", str(TEMPLATES)))


def user(*parts, role: str = "user", **extra) -> dict:
    return {"role": role, "content": [{"type": "image", "image": p} if p.endswith(".png") else
                                      {"type": "text", "text": p} for p in parts], **extra}


def only(items) -> list:
    items = list(items)
    assert not [x for x in items if isinstance(x, RowProblem)], items
    return items


def problems(items) -> list[str]:
    return [str(x) for x in items if isinstance(x, RowProblem)]


def supervised_text(to_examples, convs, processor_for) -> list[str]:  # noqa: F811
    tok = processor_for("qwen2_vl").tokenizer
    return [tok.decode([t for t in labels if t != -100]) for _, labels, _ in to_examples(convs)]


# --- TRL prompt / completion -----------------------------------------------------------------------------------------

def test_trl_vision_prompt_completion_as_documented(tmp_path, to_examples):  # noqa: F811
    """TRL's "Dataset formats" vision example, field for field: `{"type": "image"}` parts take the `images`."""
    row = {"images": [SKY],
           "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the sky?"}]}],
           "completion": [{"role": "assistant", "content": [{"type": "text", "text": "It is blue."}]}]}
    got = only(read_rows(write_jsonl(tmp_path / "trl.jsonl", [row]), "prompt_completion", str(TEMPLATES)))
    expected = as_messages(tmp_path, {"messages": [user(SKY, "What color is the sky?"), user("It is blue.", role="assistant")]})
    assert to_examples(got) == to_examples(expected)


@pytest.mark.parametrize("row", [
    {"prompt": "What color is the sky?", "completion": "It is blue."},
    {"prompt": [{"role": "user", "content": "What color is the sky?"}],
     "completion": [{"role": "assistant", "content": "It is blue."}]},
], ids=["standard", "conversational"])
def test_trl_text_prompt_completion_forms(tmp_path, to_examples, row):  # noqa: F811
    got = only(read_rows(write_jsonl(tmp_path / "trl.jsonl", [row]), "prompt_completion"))
    expected = as_messages(tmp_path, {"messages": [{"role": "user", "content": "What color is the sky?"},
                                                   {"role": "assistant", "content": "It is blue."}]})
    assert to_examples(got) == to_examples(expected)


def test_trl_untagged_images_go_first_in_the_first_user_message(tmp_path, to_examples):  # noqa: F811
    """String contents and an `images` list: TRL puts the images before the text of the first user message."""
    pics = [SKY, "shapes/images/train_0003.png"]
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which is bigger?"}],
           "completion": [{"role": "assistant", "content": "The first."}], "images": pics}
    got = only(read_rows(write_jsonl(tmp_path / "trl.jsonl", [row]), "prompt_completion", str(TEMPLATES)))
    expected = as_messages(tmp_path, {"messages": [user("Be brief.", role="system"), user(*pics, "Which is bigger?"),
                                                   user("The first.", role="assistant")]})
    assert to_examples(got) == to_examples(expected)


def test_image_tags_in_prompt_text_place_the_images(tmp_path):
    row = {"prompt": [{"role": "user", "content": "Look: <image> Which shape?"}], "completion": "A.", "images": [SKY]}
    (conv,) = only(read_rows(write_jsonl(tmp_path / "t.jsonl", [row]), "prompt_completion", str(TEMPLATES)))
    assert [(p.type, p.text) for p in conv.turns[0].parts] == [("text", "Look: "), ("image", ""), ("text", " Which shape?")]


def test_only_the_completion_is_trained(tmp_path, to_examples, processor_for):  # noqa: F811
    """The shipped example: its second row has an assistant turn in the prompt, which is context, not trained."""
    got = only(read_rows(TEMPLATES / "prompt-completion-example.jsonl", "prompt_completion"))
    rows = jsonl_rows(TEMPLATES / "messages-example.jsonl")
    rows[1]["messages"][1]["train"] = False
    assert to_examples(got) == to_examples(as_messages(tmp_path, *rows))
    second = supervised_text(to_examples, got, processor_for)[1]
    assert "The square is green." in second and "The green shape is a square." not in second


def test_trl_parquet_with_struct_parts(tmp_path, to_examples):  # noqa: F811
    """TRL's Hub datasets store parts as structs, so an image part reads `{"type": "image", "text": null}`."""
    part = pa.struct([("type", pa.string()), ("text", pa.string())])
    message = pa.struct([("role", pa.string()), ("content", pa.list_(part))])
    table = pa.table({
        "prompt": pa.array([[{"role": "user", "content": [{"type": "image", "text": None},
                                                          {"type": "text", "text": "What color is the sky?"}]}]],
                           pa.list_(message)),
        "completion": pa.array([[{"role": "assistant", "content": [{"type": "text", "text": "It is blue."}]}]],
                               pa.list_(message)),
        "images": [[{"bytes": (TEMPLATES / SKY).read_bytes(), "path": None}]]})
    pq.write_table(table, tmp_path / "trl.parquet")
    got = only(read_rows(tmp_path / "trl.parquet", "prompt_completion"))
    expected = as_messages(tmp_path, {"messages": [user(SKY, "What color is the sky?"), user("It is blue.", role="assistant")]})
    assert to_examples(got) == to_examples(expected)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi"}, 'missing "completion"'),
    ({"prompt": "Hi", "completion": [{"role": "user", "content": "Hi?"}]}, "completion message 0: role 'user'"),
    ({"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "train": True}],
      "completion": "B"}, 'prompt message 1: "train": true'),
    ({"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
      "completion": [{"role": "assistant", "content": " "}]}, "completion message 0: the assistant reply is empty"),
    ({"prompt": "Q", "completion": "A", "images": [SKY], "image": SKY}, 'both "images" and "image"'),
    ({"prompt": [], "completion": "A"}, '"prompt" must be a string or a non-empty list'),
])
def test_prompt_completion_row_problems_name_the_message(tmp_path, row, message):
    (problem,) = problems(read_rows(write_jsonl(tmp_path / "trl.jsonl", [row]), "prompt_completion", str(TEMPLATES)))
    assert problem.startswith(f"{tmp_path / 'trl.jsonl'}:1: ") and message in problem, problem


def test_trl_single_image_key(tmp_path):
    row = {"prompt": "What color is the sky?", "completion": "It is blue.", "image": SKY}
    (conv,) = only(read_rows(write_jsonl(tmp_path / "trl.jsonl", [row]), "prompt_completion", str(TEMPLATES)))
    assert [p.type for p in conv.turns[0].parts] == ["image", "text"]


def test_prompt_completion_keys_it_does_not_read_are_reported_once(tmp_path):
    row = {"prompt": [{"role": "user", "content": "Q", "name": "bob"}], "completion": "A", "extra": 1}
    notes = []
    assert len(only(read_rows(write_jsonl(tmp_path / "t.jsonl", [row, row]), "prompt_completion", warn=notes.append))) == 2
    (note,) = notes
    assert note.row == 1 and 'column "extra", message key "name"' in note.message


# --- Alpaca ----------------------------------------------------------------------------------------------------------

def test_alpaca_example_equals_the_messages_example(to_examples, reference):  # noqa: F811
    assert to_examples(read_rows(TEMPLATES / "alpaca-example.json", "alpaca")) == reference


def test_alpaca_instruction_and_input_are_joined_by_a_newline(tmp_path, to_examples):  # noqa: F811
    rows = [{"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
            {"instruction": "", "input": "Only input", "output": "OK"}]
    got = only(read_rows(write_jsonl(tmp_path / "a.jsonl", rows), "alpaca"))
    expected = as_messages(tmp_path, *({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                       for q, a in (("Translate to French.\nGood morning", "Bonjour"), ("Only input", "OK"))))
    assert to_examples(got) == to_examples(expected)


@pytest.mark.parametrize("row, message", [
    ({"instruction": "Q", "output": ""}, '"output" is empty'),
    ({"instruction": "Q", "output": "A", "history": [["only one"]]}, '"history"[0] must be a [question, answer] pair'),
    ({"instruction": "Q", "output": "A", "history": [["q", " "]]}, "history[0] answer: the assistant reply is empty"),
    ({"output": "A"}, 'missing "instruction"'),
])
def test_alpaca_row_problems(tmp_path, row, message):
    (problem,) = problems(read_rows(write_jsonl(tmp_path / "a.jsonl", [row]), "alpaca"))
    assert message in problem, problem


# --- LLaMA-Factory dataset_info.json ---------------------------------------------------------------------------------

MLLM_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}


def lf_dataset(tmp_path: Path, entries: dict, files: dict[str, list]) -> Path:
    """A LLaMA-Factory `data/` folder: dataset_info.json, data files, and the shapes images under mllm_demo_data/."""
    data = tmp_path / "data"
    shutil.copytree(IMAGES, data / "mllm_demo_data", dirs_exist_ok=True)
    for name, rows in files.items():
        if name.endswith(".jsonl"):
            (data / name).parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(data / name, rows)
        else:
            write_json(data / name, rows)
    return write_json(data / "dataset_info.json", entries)


def test_lf_mllm_demo_entry_as_documented(tmp_path, to_examples):  # noqa: F811
    """LLaMA-Factory's own mllm_demo entry and row structure; images resolve against the dataset_info.json folder."""
    entries = {"mllm_demo": {"file_name": "mllm_demo.json", "formatting": "sharegpt",
                             "columns": {"messages": "messages", "images": "images"}, "tags": MLLM_TAGS}}
    rows = [{"messages": [{"content": "<image>Who are they?", "role": "user"},
                          {"content": "They're two shapes.", "role": "assistant"},
                          {"content": "What are they doing?", "role": "user"},
                          {"content": "Standing still.", "role": "assistant"}],
             "images": ["mllm_demo_data/train_0002.png"]}]
    info = lf_dataset(tmp_path, entries, {"mllm_demo.json": rows})
    got = only(read_rows(f"{info}#mllm_demo", "messages"))
    assert got[0].source == f"{info.parent / 'mllm_demo.json'}:1"
    expected = as_messages(tmp_path, {"messages": [user(SKY, "Who are they?"), user("They're two shapes.", role="assistant"),
                                                   user("What are they doing?"), user("Standing still.", role="assistant")]})
    assert to_examples(got) == to_examples(expected)


@pytest.mark.parametrize("name", ["shapes_sharegpt", "shapes_alpaca"])
def test_lf_shipped_entries_equal_the_messages_example(name, to_examples, reference):  # noqa: F811
    assert to_examples(read_rows(f"{TEMPLATES / 'dataset_info.json'}#{name}", "messages")) == reference


def test_lf_alpaca_defaults_and_columns_replacing_them(tmp_path, to_examples):  # noqa: F811
    """No "columns": instruction / input / output (keys for Hub entries are ignored). A "columns" object replaces
    those defaults as a whole."""
    rows = [{"instruction": "Name a colour.", "input": "Warm.", "output": "Red.", "question": "Name a shape.",
             "answer": "A circle.", "system_prompt": "Be brief."}]
    entries = {"alpaca_en_demo": {"file_name": "alpaca_en_demo.json", "subset": "en", "file_sha1": "0" * 40},
               "openorca": {"file_name": "alpaca_en_demo.json",
                            "columns": {"prompt": "question", "response": "answer", "system": "system_prompt"}}}
    info = lf_dataset(tmp_path, entries, {"alpaca_en_demo.json": rows})
    defaults = only(read_rows(f"{info}#alpaca_en_demo", "messages"))
    mapped = only(read_rows(f"{info}#openorca", "messages"))
    assert to_examples(defaults) == to_examples(as_messages(tmp_path, {"messages": [
        {"role": "user", "content": "Name a colour.\nWarm."}, {"role": "assistant", "content": "Red."}]}))
    assert to_examples(mapped) == to_examples(as_messages(tmp_path, {"messages": [  # "input" is not read: no query column
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a shape."},
        {"role": "assistant", "content": "A circle."}]}, name="m2.jsonl"))


def test_lf_sharegpt_default_tags_system_column_and_system_message(tmp_path, to_examples):  # noqa: F811
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}], "sys": "Be kind."},
            {"conversations": [{"from": "system", "value": "Be short."}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hey."}], "sys": "ignored: a system message comes first"}]
    entries = {"chat": {"file_name": "chat.jsonl", "formatting": "sharegpt",
                        "columns": {"messages": "conversations", "system": "sys"}}}
    info = lf_dataset(tmp_path, entries, {"chat.jsonl": rows})
    got = only(read_rows(f"{info}#chat", "sharegpt"))
    expected = as_messages(tmp_path, *({"messages": [{"role": "system", "content": s}, {"role": "user", "content": "Hi"},
                                                     {"role": "assistant", "content": a}]}
                                       for s, a in (("Be kind.", "Hello."), ("Be short.", "Hey."))))
    assert to_examples(got) == to_examples(expected)


def test_lf_video_entry_reads_its_videos(tmp_path):
    """mllm_video_demo: the `videos` column feeds the `<video>` tags (it used to be dropped, leaving literal text)."""
    entries = {"mllm_video_demo": {"file_name": "mllm_video_demo.json", "formatting": "sharegpt",
                                   "columns": {"messages": "messages", "videos": "videos"}, "tags": MLLM_TAGS}}
    rows = [{"messages": [{"content": "<video>Why is this video funny?", "role": "user"},
                          {"content": "Because a shape moves.", "role": "assistant"}],
             "videos": ["mllm_demo_data/1.mp4"]}]
    info = lf_dataset(tmp_path, entries, {"mllm_video_demo.json": rows})
    (conv,) = only(read_rows(f"{info}#mllm_video_demo", "messages"))
    assert conv.videos == [str(info.parent / "mllm_demo_data" / "1.mp4")]
    assert conv.turns[0].text == "Why is this video funny?"


def test_lf_columns_and_keys_the_entry_does_not_read_are_reported_once_per_file(tmp_path):
    """As in LLaMA-Factory, what an entry's "columns" do not name is not read; vlmtune says so, with the fix."""
    rows = [{"conversations": [{"from": "human", "value": "Hi", "name": "al"}, {"from": "gpt", "value": "Hello."}],
             "images": ["mllm_demo_data/train_0002.png"], "id": 1},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey."}], "score": 3}]
    info = lf_dataset(tmp_path, {"chat": {"file_name": "chat.jsonl", "formatting": "sharegpt"}},
                      {"chat.jsonl": [rows[0], rows[0], rows[1]]})
    warnings = []
    assert len(only(read_rows(f"{info}#chat", "messages", warn=warnings.append))) == 3
    assert [(w.row, w.message.split(";")[0]) for w in warnings] == [
        (1, 'not read by the dataset_info.json entry "chat", so ignored (reported once per file): column "images", '
            'message key "name"'),
        (3, 'not read by the dataset_info.json entry "chat", so ignored (reported once per file): column "score"')]
    assert 'the entry reads only the columns its "columns" names ("messages": "conversations")' in warnings[0].message
    assert 'e.g. "images": "<column>"' in warnings[0].message


@pytest.mark.parametrize("formatting, row", [
    ("sharegpt", {"conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Hello."}]}),
    ("alpaca", {"instruction": "<image>Hi", "output": "Hello."})])
def test_an_lf_image_tag_with_no_images_column_in_the_entry_says_to_name_it(tmp_path, formatting, row):
    info = lf_dataset(tmp_path, {"demo": {"file_name": "d.json", "formatting": formatting}},
                      {"d.json": [{**row, "images": ["mllm_demo_data/train_0002.png"]}]})
    (problem,) = problems(read_rows(f"{info}#demo", "messages"))
    assert "1 <image> placeholder in the text but 0 images" in problem
    assert 'the entry\'s "columns" in dataset_info.json names no "images" column, so no images are read: add ' \
           '"images": "<the column holding them>"' in problem
    entries = {"demo": {"file_name": "d.json", "formatting": formatting,
                        "columns": {**DEFAULT_COLUMNS[formatting], "images": "images"}}}
    info.write_text(json.dumps(entries))
    only(read_rows(f"{info}#demo", "messages"))


def test_lf_folder_file_name_reads_every_file_in_name_order(tmp_path):
    row = {"instruction": "Q{}", "output": "A{}"}
    files = {f"parts/{n}": [{k: v.format(n) for k, v in row.items()}] for n in ("b.jsonl", "a.json")}
    info = lf_dataset(tmp_path, {"split_up": {"file_name": "parts"}}, files)
    got = only(read_rows(f"{info}#split_up", "messages"))
    assert [c.source for c in got] == [f"{info.parent / 'parts' / 'a.json'}:1", f"{info.parent / 'parts' / 'b.jsonl'}:1"]
    (info.parent / "parts" / "c.csv").write_text("instruction,output\nQ,A\n")
    (problem,) = problems(read_rows(f"{info}#split_up", "messages"))
    assert "c.csv is not a .json, .jsonl, .parquet file" in problem


def test_lf_tool_call_rows_are_refused_one_by_one(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Weather?"}, {"from": "function_call", "value": "{}"},
                               {"from": "observation", "value": "{}"}, {"from": "gpt", "value": "Sunny."}]},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}]
    info = lf_dataset(tmp_path, {"glaive": {"file_name": "g.json", "formatting": "sharegpt"}}, {"g.json": rows})
    items = list(read_rows(f"{info}#glaive", "messages"))
    assert len(items) == 2 and not isinstance(items[1], RowProblem)
    assert "message 1: \"from\": 'function_call' is the entry's function_tag" in str(items[0])


def test_lf_tags_replace_the_defaults(tmp_path):
    """mllm_demo's tags name no system_tag, so (as in LLaMA-Factory) a system message is not known there."""
    rows = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                          {"role": "assistant", "content": "A"}]}]
    entries = {"demo": {"file_name": "d.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
                        "tags": MLLM_TAGS}}
    (problem,) = problems(read_rows(f"{lf_dataset(tmp_path, entries, {'d.json': rows})}#demo", "messages"))
    assert "message 0: \"role\": 'system' is none of the entry's roles" in problem
    assert 'add "system_tag": "system"' in problem


@pytest.mark.parametrize("entry, message", [
    ({"hf_hub_url": "llamafactory/alpaca_en", "ms_hub_url": "llamafactory/alpaca_en"},
     "is on a hub (hf_hub_url: llamafactory/alpaca_en) and vlmtune reads local files only"),
    ({"file_name": "d.json", "ranking": True, "formatting": "sharegpt",
      "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
     '"ranking": true marks preference pairs'),
    ({"file_name": "d.json", "num_samples": 10}, '"num_samples"'),
    ({"file_name": "d.json", "formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"},
      "tags": MLLM_TAGS}, '"columns.kto_tag" marks preference or KTO data'),
    ({"file_name": "d.json", "formatting": "openai"}, "data.format: messages"),
    ({"file_name": "d.json", "formatting": "sharegpt", "columns": {"images": "images"}},
     '"columns" names no "messages" column'),
    ({"file_name": "d.json", "columns": {"prompt": "text"}}, "pretraining text"),
    ({"file_name": "d.json", "formatting": "sharegpt", "tags": {"role_tag": "role", "content_tag": "content"}},
     '"tags" names no "user_tag"'),
    ({"file_name": "d.json", "tags": MLLM_TAGS}, 'add "formatting": "sharegpt"'),
    ({"file_name": "d.json", "columns": {"prompt": "instruction", "response": "output", "messages": "m"}},
     '"columns.messages" applies to sharegpt data'),
    ({"file_name": "d.json", "colums": {}}, 'unknown key "colums"; did you mean "columns"?'),
    ({"file_name": "d.json", "columns": {"prompt": "instruction", "response": "output", "imges": "images"}},
     '"columns.imges" is not a LLaMA-Factory column; did you mean "images"?'),
    ({"file_name": "d.json", "formatting": "sharegpt", "tags": {**MLLM_TAGS, "user_tags": "u"}},
     '"tags.user_tags" is not a LLaMA-Factory tag; did you mean "user_tag"?'),
    ({"file_name": "d.json", "split": "validation"}, "'validation' applies to Hub datasets"),
    ({"file_name": "missing.json"}, "\"file_name\" 'missing.json' not found"),
])
def test_lf_entries_that_cannot_be_read_are_refused_with_the_reason(tmp_path, entry, message):
    info = lf_dataset(tmp_path, {"e": entry}, {"d.json": [{"instruction": "Q", "output": "A"}]})
    (problem,) = problems(read_rows(f"{info}#e", "messages"))
    assert problem.startswith(f"{info}#e:1: ") and message in problem, problem


def test_lf_unknown_dataset_name_lists_the_close_one(tmp_path):
    info = lf_dataset(tmp_path, {"mllm_demo": {"file_name": "d.json"}}, {"d.json": []})
    (problem,) = problems(read_rows(f"{info}#mllm_dem", "messages"))
    assert 'no dataset "mllm_dem"' in problem and 'did you mean "mllm_demo"' in problem
    (problem,) = problems(read_rows(info, "messages"))
    assert "name the dataset" in problem and "mllm_demo" in problem


def test_a_recipe_names_an_lf_dataset_relative_to_its_folder(tmp_path):
    info = lf_dataset(tmp_path, {"demo": {"file_name": "d.json"}}, {"d.json": [{"instruction": "Q", "output": "A"}]})
    path = write_json(tmp_path / "recipe.yaml", {"model": {"name_or_path": "builtin:tiny-qwen2-vl"},
                                                 "data": {"train": "data/dataset_info.json#demo"}, "output_dir": "out"})
    assert load_recipe(path).data.train == f"{info}#demo"
    with pytest.raises(RecipeError) as e:
        load_recipe(path, overrides=[f"data.train={info}#dem"])
    assert "data.train" in str(e.value) and 'did you mean "demo"' in str(e.value)


def test_data_format_and_columns_are_for_plain_files(tmp_path):
    """An entry brings its own layout: with every split an entry, data.format / data.columns set are refused; with a
    plain file beside it they are that file's."""
    info = lf_dataset(tmp_path, {"demo": {"file_name": "d.json"}}, {"d.json": [{"instruction": "Q", "output": "A"}]})
    write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "Q", "completion": "A"}])
    base = {"model": {"name_or_path": "builtin:tiny-qwen2-vl"}, "output_dir": "out"}
    path = write_json(tmp_path / "recipe.yaml", {**base, "data": {"train": f"{info}#demo", "format": "llava",
                                                                 "columns": {"image": "img"}}})
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert "data.format: is llava, but the data is LLaMA-Factory alpaca data" in str(e.value)
    assert "data.columns: does not apply to a dataset_info.json entry" in str(e.value)
    path = write_json(tmp_path / "recipe.yaml", {**base, "data": {"train": f"{info}#demo", "eval": "eval.jsonl",
                                                                 "format": "prompt_completion"}})
    assert load_recipe(path).data.format == "prompt_completion"


def test_validate_reads_an_lf_dataset_and_a_prompt_completion_file(tmp_path, capsys):
    shutil.copytree(IMAGES, tmp_path / "shapes" / "images")
    for name in ("dataset_info.json", "llamafactory-example.json", "alpaca-example.json",
                 "prompt-completion-example.jsonl"):
        shutil.copy(TEMPLATES / name, tmp_path / name)
    code, out, _ = run(capsys, "validate", recipe(tmp_path, data__train="dataset_info.json#shapes_sharegpt"))
    assert code == 0 and "3 rows -> 3 examples" in out, out
    code, out, _ = run(capsys, "validate", recipe(tmp_path, data__train="prompt-completion-example.jsonl",
                                                  data__format="prompt_completion"))
    assert code == 0 and "3 rows -> 3 examples" in out, out


def test_predict_reads_prompts_from_the_new_layouts(tmp_path, capsys):
    prompts = read_prompts(f"{TEMPLATES / 'dataset_info.json'}#shapes_alpaca")
    assert [p.reference for p in prompts] == ["The triangle is on the left.", "The square is green.",
                                              "There are 5 shapes in total."]
    prompts = read_prompts(TEMPLATES / "prompt-completion-example.jsonl", fmt="prompt_completion")
    assert prompts[1].reference == "The square is green." and [t.role for t in prompts[1].turns] == [
        "user", "assistant", "user"]
    code, _, err = run(capsys, "predict", tmp_path, "--data", TEMPLATES / "prompt-completion-example.jsonl",
                       "--format", "prompt_completion")
    assert code == 2 and "invalid choice" not in err and "neither a model folder" in err
