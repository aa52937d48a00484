"""Data hygiene in `vlmtune validate`: near-duplicate images by pHash, duplicate samples, --write-clean."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from vlmtune import hygiene
from vlmtune.cli import main
from vlmtune.errors import VlmtuneError
from vlmtune.hygiene import index, phash
from vlmtune.hygiene.rows import SampleRow

from .conftest import write_jsonl


def _picture(seed: int, size: int = 128) -> Image.Image:
    """A distinct busy picture: a smooth random colour field with four random discs and boxes on it."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = (int(v) for v in rng.integers(0, size - 30, 2))
        s = int(rng.integers(15, 40))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.integers(2) else draw.rectangle)([x, y, x + s, y + s], fill=fill)
    return img


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


COPIES = {  # how each copy is made from its original
    "half": lambda im: im.resize((64, 64), Image.LANCZOS),
    "double": lambda im: im.resize((256, 256), Image.BICUBIC),
    "jpeg35": lambda im: _jpeg(im, 35),
    "crop": lambda im: im.crop((3, 3, 125, 125)),  # about 2% off each side
}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """(folder, originals, copies): 12 distinct pictures and, of the first four, one copy of each kind."""
    root = tmp_path_factory.mktemp("pictures")
    originals = []
    for seed in range(12):
        path = root / f"orig_{seed:02d}.png"
        _picture(seed).save(path)
        originals.append(path)
    copies = {}
    for seed in range(4):
        for kind, make in COPIES.items():
            path = root / f"copy_{seed:02d}_{kind}.{'jpg' if kind == 'jpeg35' else 'png'}"
            img = make(Image.open(originals[seed]).convert("RGB"))
            img.save(path, quality=95) if path.suffix == ".jpg" else img.save(path)
            copies[(seed, kind)] = path
    return root, originals, copies


def _row(n: int, image, text: str, split: str = "train", file: str = "train.jsonl") -> SampleRow:
    return SampleRow(split, file, n, (str(image),), text)


def test_copies_are_grouped_with_their_original_and_distinct_pictures_are_not(pictures):
    _, originals, copies = pictures
    rows = [_row(i + 1, p, f"question {i}") for i, p in enumerate(originals)]
    rows += [_row(100 + i, p, f"copy {i}") for i, p in enumerate(copies.values())]
    found = hygiene.find_near_duplicates(rows, progress=False)
    assert found.images == 12 + len(copies) and not found.unhashed
    groups = [set(g.images) for g in found.groups]
    want = [{str(originals[s])} | {str(copies[(s, k)]) for k in COPIES} for s in range(4)]
    assert sorted(groups, key=sorted) == sorted(want, key=sorted)  # every copy found; no distinct picture joined
    for group in found.groups:
        assert group.images[0].endswith(".png") and "orig_" in group.images[0]  # the first-seen file is the original
    assert not found.duplicates  # the texts differ
    alone = hygiene.find_near_duplicates(rows[:12], progress=False)
    assert not alone.groups and not alone.duplicates



def test_the_same_layout_in_other_colours_is_not_a_near_duplicate(tmp_path):
    """pHash sees brightness only: a red and a blue square in the same place hash alike; the colours keep them apart,
    while a resized copy of either still joins it."""
    paths = {}
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220)), ("green", (30, 160, 30))):
        img = Image.new("RGB", (128, 128), "white")
        ImageDraw.Draw(img).rectangle([30, 30, 80, 80], fill=colour)
        paths[name] = tmp_path / f"{name}.png"
        img.save(paths[name])
    Image.open(paths["red"]).resize((64, 64), Image.LANCZOS).save(tmp_path / "red_half.png")
    sigs = {n: phash._phash(str(p)) for n, p in paths.items()}
    assert index.close_pairs(phash.as_bits(sigs.values()), 8)  # alike by pHash alone
    rows = [_row(i + 1, p, f"q {i}") for i, p in enumerate([*paths.values(), tmp_path / "red_half.png"])]
    found = hygiene.find_near_duplicates(rows, progress=False)
    assert [set(g.images) for g in found.groups] == [{str(paths["red"]), str(tmp_path / "red_half.png")}]

def test_duplicate_samples_repeat_image_and_text(pictures):
    _, originals, copies = pictures
    rows = [_row(1, originals[0], "What is it?  A DISC."), _row(2, originals[1], "What is it? A disc."),
            _row(3, copies[(0, "jpeg35")], "what is it? a disc."),  # same text up to case and spaces
            _row(4, copies[(0, "half")], "What is it? A box."),  # same picture, another question
            _row(5, originals[0], "What is it? A disc.", split="eval", file="eval.jsonl")]
    found = hygiene.find_near_duplicates(rows, progress=False)
    assert [(d.row.row, d.original.row) for d in found.duplicates] == [(3, 1), (5, 1)]
    copied = {row.row: first.row for row, first in found.copy_rows().items()}
    assert copied == {3: 1, 4: 1}  # row 5 shows the original file itself


@pytest.mark.parametrize("method", ["flat", "multihash"])
def test_close_pairs_are_exactly_the_brute_force_pairs(method):
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 256, (1500, 8), dtype=np.uint8)
    for k in range(300):  # near copies at 0..11 bits
        b = np.unpackbits(bits[k])
        b[rng.choice(64, int(rng.integers(0, 12)), replace=False)] ^= 1
        bits[1000 + k] = np.packbits(b)
    apart = np.unpackbits(bits[:, None, :] ^ bits[None, :, :], axis=2).sum(2)
    for distance in (0, 3, 8, 11, 16):
        i, j = np.nonzero(np.triu(apart <= distance, 1))
        want = {(int(a), int(b), int(apart[a, b])) for a, b in zip(i, j, strict=True)}
        assert set(index.close_pairs(bits, distance, method)) == want, distance


def test_each_image_is_hashed_once_across_runs_and_paths(pictures, tmp_path, monkeypatch):
    _, originals, _ = pictures
    twin = tmp_path / "twin.png"
    twin.write_bytes(originals[0].read_bytes())
    calls = []
    real = phash._phash
    monkeypatch.setattr(phash, "_phash", lambda p: calls.append(p) or real(p))
    first, _ = phash.hash_images([str(originals[0]), str(twin), str(originals[1])], progress=False)
    assert len(calls) == 2 and first[str(twin)] == first[str(originals[0])]
    again, _ = phash.hash_images([str(originals[1]), str(twin)], progress=False)
    assert len(calls) == 2 and again[str(twin)] == first[str(originals[0])]
    assert (phash.cache_dir() / "phash-v2.json").is_file()


def _recipe(tmp_path, train: str, **data) -> str:
    doc = {"model": {"name_or_path": "builtin:tiny-qwen2-vl"}, "data": {"train": train, **data},
           "output_dir": str(tmp_path / "out")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _message_row(image: str, question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": question}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


def test_validate_near_duplicates_reports_rows_and_writes_a_clean_copy(pictures, tmp_path, capsys):
    root, originals, copies = pictures
    rows = [_message_row(str(p), "What is in the picture?", f"Picture {i}.") for i, p in enumerate(originals[:6])]
    rows.append(_message_row(str(copies[(1, "crop")]), "What is in the picture?", "Picture 1."))  # line 7: dup
    rows.append(_message_row(str(copies[(2, "double")]), "Which colour?", "Blue."))  # line 8: a copy, new text
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    before = data.read_bytes()
    recipe = _recipe(tmp_path, str(data), near_duplicate_distance=6)
    assert main(["validate", recipe, "--near-duplicates", "--write-clean", str(tmp_path / "clean.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "Hamming distance <= 6 of 64" in out and "2 groups of near-duplicates, 1 duplicate sample" in out
    assert f"train.jsonl:7: {copies[(1, 'crop')]} (copy)" in out and f"train.jsonl:2: {originals[1]}" in out
    assert "duplicate sample: " in out and "train.jsonl:7 repeats " in out
    assert "7 of 8 rows" in out and "1 dropped: 1 duplicate sample" in out
    kept = (tmp_path / "clean.jsonl").read_text().splitlines()
    assert kept == [line for n, line in enumerate(before.decode().splitlines(), start=1) if n != 7]
    clean = tmp_path / "clean.jsonl"
    assert main(["validate", recipe, "--near-duplicates", "--drop-near-duplicate-images", "--overwrite",
                 "--write-clean", str(clean)]) == 0
    assert "6 of 8 rows" in capsys.readouterr().out and len(clean.read_text().splitlines()) == 6
    # the input is never replaced, an existing file only with --overwrite
    assert main(["validate", recipe, "--near-duplicates", "--overwrite", "--write-clean", str(data)]) == 2
    assert "is the input data file itself" in capsys.readouterr().err
    assert main(["validate", recipe, "--near-duplicates", "--write-clean", str(clean)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert data.read_bytes() == before


@pytest.mark.parametrize("container", ["json", "parquet", "dataset"])
def test_write_clean_keeps_the_input_container(pictures, tmp_path, container):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, originals, copies = pictures
    rows = [{"image": str(originals[0]), "question": "Q?", "answer": "A."},
            {"image": str(originals[1]), "question": "Q?", "answer": "B."},
            {"image": str(copies[(0, "jpeg35")]), "question": "Q?", "answer": "A."}]
    data = tmp_path / f"train.{container}"
    if container == "json":
        data.write_text(json.dumps(rows, indent=1))
    elif container == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), data)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(data))
    report = hygiene.check(_recipe(tmp_path, str(data), format="vqa"), progress=False)
    result = report.write_clean(tmp_path / f"clean.{container}")
    assert result.dropped == 1 and result.reasons == {"duplicate sample": 1}
    if container == "dataset":
        import datasets

        got = datasets.load_from_disk(str(tmp_path / "clean.dataset")).to_list()
    else:
        got = json.loads((tmp_path / "clean.json").read_text()) if container == "json" else \
            pq.read_table(tmp_path / "clean.parquet").to_pylist()
    assert got == rows[:2]
    with pytest.raises(VlmtuneError, match="name it \\*.parquet" if container == "parquet" else "already exists"):
        report.write_clean(tmp_path / ("clean.jsonl" if container == "parquet" else f"clean.{container}"))
