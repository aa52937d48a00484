"""Checkpoints are complete or absent (kill -9, full disk), `latest` is the newest complete one, and the checks
that a resume continues the same run (the refusals on real runs are in test_outputs.py)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import vlmtune
from vlmtune import checkpoints, disk
from vlmtune.run_folder import RunFolder

from .run_fixtures import ROOT, can_mount_tmpfs, quiet, recipe_at, recipe_file, write_train_data

WORKER = ROOT / "tests" / "outputs_worker.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_train_data(tmp_path_factory.mktemp("data"))


def _identity_in(checkpoint: Path, **changes) -> None:
    recipe = vlmtune.load_recipe(None, {"model.name_or_path": "builtin:tiny-qwen2-vl", "data.train": "x.jsonl"},
                                 check_paths=False)
    saved = {"recipe": recipe.to_dict(), "world_size": 1, "train_data": {"examples": 8, "tokens": 400}}
    saved.update(changes)
    checkpoint.mkdir(parents=True)
    (checkpoint / checkpoints.RESUME_FILE).write_text(json.dumps(saved))


def _plan(train_path: str, examples: int, tokens: int):
    recipe = vlmtune.load_recipe(None, {"model.name_or_path": "builtin:tiny-qwen2-vl", "data.train": train_path},
                                 check_paths=False)
    return SimpleNamespace(recipe=recipe, train=SimpleNamespace(examples=[None] * examples, num_tokens=tokens))


def test_the_same_run_check_sees_data_content_and_process_count_and_equal_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "checkpoint-2"
    _identity_in(ckpt, world_size=2)
    with pytest.raises(vlmtune.VlmtuneError) as e:
        checkpoints.check_same_run(str(ckpt), _plan("x.jsonl", examples=9, tokens=450))
    assert "  - data.train content: 8 examples, 400 tokens -> 9 examples, 450 tokens" in str(e.value)
    assert "  - processes (world size, part of the batch size): 2 -> 1" in str(e.value)
    (tmp_path / "sub").mkdir()
    ckpt = tmp_path / "checkpoint-4"
    _identity_in(ckpt)
    checkpoints.check_same_run(str(ckpt), _plan(str(tmp_path / "sub" / ".." / "x.jsonl"), examples=8, tokens=400))


def test_latest_is_the_newest_complete_checkpoint_and_incomplete_ones_are_named(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    for name, complete in (("checkpoint-2", True), ("checkpoint-6", False), (".saving/checkpoint-4", False)):
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "adapter_model.safetensors").write_bytes(b"partial")
        if complete:
            (ckpts / name / "trainer_state.json").write_text("{}")
    folder = RunFolder(tmp_path / "run", tmp_path / "run")
    recipe = vlmtune.load_recipe(None, {"model.name_or_path": "builtin:tiny-qwen2-vl", "data.train": "x.jsonl",
                                        "train.resume_from_checkpoint": "latest"}, check_paths=False)
    logs = []
    assert checkpoints.resume_point(recipe, folder, logs.append) == str(ckpts / "checkpoint-2")
    assert any("ignoring incomplete checkpoints" in line and str(ckpts / ".saving" / "checkpoint-4") in line
               and str(ckpts / "checkpoint-6") in line for line in logs)
    assert not (ckpts / ".saving" / "checkpoint-4").exists()  # a staged leftover is removed
    assert (ckpts / "checkpoint-6").is_dir()  # one in place is only ignored: vlmtune did not stage it
    recipe.train.resume_from_checkpoint = str(ckpts / "checkpoint-6")
    with pytest.raises(vlmtune.VlmtuneError, match="checkpoint-6 is not a complete checkpoint"):
        checkpoints.resume_point(recipe, folder, quiet)


def test_a_full_disk_before_a_save_is_refused_and_the_previous_checkpoint_kept(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    free = iter([10**12])  # room for the first checkpoint, then 1000 bytes

    monkeypatch.setattr(disk, "free_bytes", lambda folder: next(free, 1000))
    with pytest.raises(disk.DiskFullError) as e:
        vlmtune.train(recipe_at(out, data), log=quiet)
    message = str(e.value)
    ckpts = out / "checkpoints"
    assert f"checkpoint {ckpts / 'checkpoint-2'} was not saved (the newest complete checkpoint, checkpoint-1, " \
           f"is intact): not enough free disk space in {ckpts}: the write needs about " in message
    assert "1000 B is free" in message
    assert checkpoints.is_complete(ckpts / "checkpoint-1")
    assert not (ckpts / "checkpoint-2").exists() and not (ckpts / ".saving").exists()
    assert not (out / "vlmtune.json").exists()


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                                                  "failed writing file data/0: file write failed")])
def test_a_disk_that_fills_during_a_save_is_named_and_the_partial_checkpoint_removed(failure, data, tmp_path,
                                                                                      monkeypatch):
    original = torch.save

    def save(obj, f, *args, **kwargs):
        path = Path(str(f))
        if path.name == "optimizer.pt" and path.parent.name == "checkpoint-2":
            path.write_bytes(b"PK\x03\x04")
            raise failure
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    with pytest.raises(disk.DiskFullError) as e:
        vlmtune.train(recipe_at(out, data), log=quiet)
    ckpts = out / "checkpoints"
    assert f"checkpoint {ckpts / 'checkpoint-2'} was not saved (the newest complete checkpoint, checkpoint-1, " \
           f"is intact): the disk filled up while writing {ckpts / 'checkpoint-2'} (needed about " in str(e.value)
    assert "free now); the partial files were removed" in str(e.value)
    assert checkpoints.is_complete(ckpts / "checkpoint-1")
    assert not (ckpts / "checkpoint-2").exists() and not (ckpts / ".saving").exists()


def test_a_full_disk_at_the_final_write_leaves_no_adapter(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(disk, "free_bytes", lambda folder: 1000 if Path(folder) == out else 10**12)
    with pytest.raises(disk.DiskFullError, match=f"the adapter was not written to {out}: not enough free disk "
                                                 f"space in {out}: the write needs about .* 1000 B is free"):
        vlmtune.train(recipe_at(out, data, **{"train.max_steps": 1, "train.save_steps": 1000}), log=quiet)
    assert not (out / "adapter_model.safetensors").exists() and not (out / "vlmtune.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def _worker(*args, prefix=(), timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*prefix, sys.executable, str(WORKER), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_save_then_resume_latest(data, tmp_path):
    out = tmp_path / "run"
    recipe = recipe_file(tmp_path, data, max_steps=4, save_steps=2)
    proc = _worker("--kill-saving", 4, "--", "sft", recipe, f"output_dir={out}")
    assert proc.returncode == -9, proc.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert checkpoints.is_complete(ckpts / "checkpoint-2")
    assert not (ckpts / "checkpoint-4").exists()  # the half-written save is not where `latest` looks
    assert (ckpts / ".saving" / "checkpoint-4" / "optimizer.pt").is_file()
    assert not (out / "vlmtune.json").exists()

    again = recipe_at(out, data, **{"train.max_steps": 4, "train.save_steps": 2})
    with pytest.raises(vlmtune.VlmtuneError, match="holds a run that did not finish"):
        vlmtune.train(again, log=quiet)
    logs = []
    again.train.resume_from_checkpoint = "latest"
    result = vlmtune.train(again, log=logs.append)
    assert result.metrics["global_step"] == 4
    assert any("ignoring incomplete checkpoint" in line and str(ckpts / ".saving" / "checkpoint-4") in line
               for line in logs)
    assert f"resuming from {ckpts / 'checkpoint-2'}" in logs
    assert checkpoints.is_complete(ckpts / "checkpoint-4") and not (ckpts / ".saving").exists()


@pytest.mark.slow
@pytest.mark.parametrize("space_check", [True, False], ids=["checked-before", "write-fails"])
def test_a_real_disk_that_fills_during_training(space_check, data, tmp_path):
    """On a private 8 MiB tmpfs filled up after the first checkpoint: the second is refused before it is
    written, or (free-space check off) its write fails on the full disk; either way a clear error, no partial
    checkpoint, and checkpoint-2 (the first one) intact."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if not can_mount_tmpfs(mount):
        pytest.skip("no private tmpfs mounts here (unshare -rm): the patched tests above cover it")
    recipe = recipe_file(tmp_path, data, max_steps=4, save_steps=2)
    report = tmp_path / "report.json"
    options = ["--fill-disk-after-save", 200_000, "--report", report] + ([] if space_check else ["--no-space-check"])
    prefix = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=8m tmpfs "$0" && exec "$@"', mount]
    proc = _worker(*options, "--", "sft", recipe, f"output_dir={mount / 'run'}", prefix=prefix)
    result = json.loads(report.read_text())
    assert result["rc"] == 2, proc.stderr[-3000:]
    ckpts = mount / "run" / "checkpoints"
    expected = ("not enough free disk space" if space_check else
                f"the disk filled up while writing {ckpts / 'checkpoint-4'}")
    assert f"error: checkpoint {ckpts / 'checkpoint-4'} was not saved (the newest complete checkpoint, " \
           f"checkpoint-2, is intact): {expected}" in proc.stderr
    assert "Traceback" not in proc.stderr
    files = result["files"]
    assert "checkpoints/checkpoint-2/trainer_state.json" in files
    assert not [f for f in files if "checkpoint-4" in f]
