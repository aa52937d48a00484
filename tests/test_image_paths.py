"""Image paths: with data.image_root, every path (relative, absolute, through symlinks) stays inside it;
without it, paths are used as given (relative ones against the data file's folder)."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from vlmtune.data.formats import read_rows
from vlmtune.data.images import ImageProblem, ImageResolver


def vqa(image: str) -> dict:
    return {"image": image, "question": "What is it?", "answer": "A square."}


@pytest.fixture
def tree(tmp_path):
    """tmp/root/{inside.png, sub/, link-out.png -> ../outside.png, link-in.png -> inside.png}, tmp/outside.png,
    tmp/data/train.jsonl (outside the root, as data files often are)."""
    root, data = tmp_path / "root", tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    data.mkdir()
    for path in (root / "inside.png", tmp_path / "outside.png", data / "beside.png"):
        Image.new("RGB", (8, 8)).save(path)
    (root / "link-out.png").symlink_to(tmp_path / "outside.png")
    (root / "link-in.png").symlink_to(root / "inside.png")
    (root / "sub" / "link-dir-out").symlink_to(tmp_path, target_is_directory=True)
    return tmp_path


def outcome(tree, refs: list[str], image_root) -> list[str]:
    """For each row: "ok" or its problem message."""
    path = tree / "data" / "train.jsonl"
    path.write_text("".join(json.dumps(vqa(r)) + "\n" for r in refs))
    out = {}
    for item in read_rows(path, "vqa", str(image_root) if image_root else None):
        if hasattr(item, "message"):
            out[item.row] = item.message
        else:
            out[int(item.source.rpartition(":")[2])] = "ok"
    return [out[n] for n in range(1, len(refs) + 1)]


ESCAPES = ["../outside.png", "sub/../../outside.png", "link-out.png", "sub/link-dir-out/outside.png",
           "../../../../../../../../etc/passwd"]


@pytest.mark.parametrize("ref", ESCAPES)
def test_a_path_that_leaves_image_root_is_refused_with_its_row(tree, ref):
    first, second = outcome(tree, ["inside.png", ref], tree / "root")
    assert first == "ok"
    assert "is outside data.image_root" in second and ref in second and "symlinks" in second


def test_absolute_paths_count_by_where_they_really_lead(tree):
    root = tree / "root"
    results = outcome(tree, [str(root / "inside.png"), str(root / "link-out.png"), str(tree / "outside.png")], root)
    assert results[0] == "ok" and all("is outside data.image_root" in r for r in results[1:])


def test_paths_that_stay_inside_are_kept_as_written(tree):
    root = tree / "root"
    resolve = ImageResolver(tree / "data", root)
    assert resolve("sub/../inside.png") == str(root / "sub/../inside.png")
    assert resolve("link-in.png") == str(root / "link-in.png")  # a symlink to a file inside the root is fine


def test_a_symlinked_image_root_is_followed_itself(tree):
    (tree / "root-link").symlink_to(tree / "root", target_is_directory=True)
    assert outcome(tree, ["inside.png", "link-out.png"], tree / "root-link")[0] == "ok"
    assert "is outside" in outcome(tree, ["link-out.png"], tree / "root-link")[0]


def test_without_image_root_paths_are_used_as_given(tree):
    assert outcome(tree, ["beside.png", "../outside.png", str(tree / "root" / "link-out.png")], None) == ["ok"] * 3
    resolve = ImageResolver(tree / "data")
    assert resolve("../outside.png") == str(tree / "data" / "../outside.png")


def test_a_missing_file_inside_the_root_is_not_refused_as_outside(tree):
    resolve = ImageResolver(tree / "data", tree / "root")
    assert resolve("sub/not-yet.png") == str(tree / "root" / "sub" / "not-yet.png")
    (tree / "root" / "dangling.png").symlink_to(tree / "nowhere.png")
    with pytest.raises(ImageProblem, match="is outside data.image_root"):
        resolve("dangling.png")


def test_datasets_image_dicts_are_confined_too(tree):
    resolve = ImageResolver(tree / "data", tree / "root")
    with pytest.raises(ImageProblem, match="is outside data.image_root"):
        resolve({"bytes": None, "path": "../outside.png"})
    assert os.path.isfile(resolve({"bytes": None, "path": "inside.png"}))
