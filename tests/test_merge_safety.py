"""merge-adapter never replaces what it was not asked to: --out rules, --force, and leftovers of killed merges."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest

import vlmtune
from vlmtune.demo import builtin_model_path

from .test_merge import QUIET, copy_adapter, run, trained_adapter  # noqa: F401 (fixture)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def runs(trained_adapter, tmp_path):  # noqa: F811
    """runs/a: the adapter to merge; runs/b: a sibling run; spare/c: a run in a folder of its own."""
    adapter = copy_adapter(trained_adapter("qwen2_vl"), tmp_path / "runs" / "a")
    sibling = tmp_path / "runs" / "b"
    sibling.mkdir()
    (sibling / "vlmtune.json").write_text(json.dumps({"family": "qwen2_vl", "base_model": "x"}))
    (sibling / "notes.txt").write_text("a sibling run")
    (tmp_path / "spare" / "c").mkdir(parents=True)
    (tmp_path / "spare" / "c" / "adapter_config.json").write_text("{}")
    return adapter


@pytest.mark.parametrize("out, expected", [
    ("runs", "contains the adapter folder"),  # issue 8: this deleted the adapter and its sibling
    ("runs/a", "must not be the adapter folder"),
    ("runs/a/merged", "lies inside the adapter folder"),
    ("runs/b", "holds a vlmtune run (vlmtune.json)"),
    ("runs/b/merged", "which holds a vlmtune run (vlmtune.json)"),
    ("spare", "holds the vlmtune run"),
])
@pytest.mark.parametrize("force", [False, True])
def test_out_never_is_contains_or_lies_inside_a_run(runs, tmp_path, capsys, out, expected, force):
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "merge-adapter", runs, "--out", tmp_path / out, "--no-check",
                       *(["--force"] if force else []))
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before
    assert not (tmp_path / out / "config.json").exists()


@pytest.mark.parametrize("out, expected", [
    ("bases/qwen", "must not be the base model folder"),
    ("bases/qwen/merged", "lies inside the base model folder"),
    ("bases", "contains the base model folder"),
])
def test_out_never_is_contains_or_lies_inside_the_base(trained_adapter, tmp_path, capsys, out, expected):  # noqa: F811
    base = tmp_path / "bases" / "qwen"
    shutil.copytree(builtin_model_path("tiny-qwen2-vl"), base)
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "merge-adapter", trained_adapter("qwen2_vl"), "--out", tmp_path / out,
                       "--base", base, "--no-check", "--force")
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before


def test_the_next_merge_removes_the_leftovers_of_a_killed_one_and_only_those(trained_adapter, tmp_path,  # noqa: F811
                                                                            monkeypatch):
    from vlmtune.merge import io as merge_io

    adapter, out = trained_adapter("qwen2_vl"), tmp_path / "m"

    def killed(self, name, tensor):
        raise KeyboardInterrupt  # a kill: the clean-up below never runs

    with monkeypatch.context() as m:
        m.setattr(merge_io.ShardWriter, "write", killed)
        m.setattr(shutil, "rmtree", lambda *a, **k: None)
        with pytest.raises(KeyboardInterrupt):
            vlmtune.merge_adapter(adapter, out, **QUIET)
    (merging,) = [p for p in tmp_path.iterdir() if p.name.startswith(".m.merging-")]
    assert any(merging.iterdir())  # a partial folder, as a killed merge leaves it
    old = Path(tempfile.mkdtemp(prefix=".m.old-", dir=tmp_path))  # killed between move_into_place's two renames
    (old / "m").mkdir()
    keep = [tmp_path / ".m.merging-mine", tmp_path / ".mm.merging-abcd1234", tmp_path / "m.merging-abcd1234",
            tmp_path / ".m.old-abcd1234.txt"]  # not leftovers of merges to `m`
    for path in keep:
        path.mkdir() if path.suffix != ".txt" else path.write_text("mine")
    messages = []
    vlmtune.merge_adapter(adapter, out, check=False, log=messages.append, progress=False)
    assert not merging.exists() and not old.exists()
    assert all(path.exists() for path in keep) and (out / "config.json").is_file()
    assert sum("left beside" in line and "interrupted earlier merge" in line for line in messages) == 2
