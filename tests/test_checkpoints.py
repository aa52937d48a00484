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
           f"is intact): not enough disk space in {ckpts}: the write needs about " in message
    assert "1.00 KB are free" in message
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
    with pytest.raises(disk.DiskFullError, match=f"the adapter was not written to {out}: not enough disk "
                                                 f"space in {out}: the write needs about .* 1.00 KB are free"):
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
    expected = ("not enough disk space" if space_check else
                f"the disk filled up while writing {ckpts / 'checkpoint-4'}")
    assert f"error: checkpoint {ckpts / 'checkpoint-4'} was not saved (the newest complete checkpoint, " \
           f"checkpoint-2, is intact): {expected}" in proc.stderr
    assert "Traceback" not in proc.stderr
    files = result["files"]
    assert "checkpoints/checkpoint-2/trainer_state.json" in files
    assert not [f for f in files if "checkpoint-4" in f]


def _whole(checkpoint: Path, mark: bytes) -> None:
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(mark)
    (checkpoint / "trainer_state.json").write_text("{}")


def test_a_publish_cut_short_between_its_renames_is_finished_not_deleted(tmp_path):
    """A kill after publish parked the earlier checkpoint-4 and before it moved the new one in."""
    ckpts = tmp_path / "run" / "checkpoints"
    _whole(ckpts / "checkpoint-2", b"2")
    _whole(ckpts / ".saving" / "checkpoint-4", b"new 4")
    _whole(ckpts / ".saving" / "checkpoint-4.replaced", b"old 4")
    _whole(ckpts / ".saving" / "checkpoint-6.replaced", b"only 6")  # (no new copy: the parked one is kept)
    recipe = vlmtune.load_recipe(None, {"model.name_or_path": "builtin:tiny-qwen2-vl", "data.train": "x.jsonl",
                                        "train.resume_from_checkpoint": "latest"}, check_paths=False)
    logs = []
    assert checkpoints.resume_point(recipe, RunFolder(tmp_path / "run", tmp_path / "run"), logs.append) == \
        str(ckpts / "checkpoint-6")
    assert (ckpts / "checkpoint-4" / "adapter_model.safetensors").read_bytes() == b"new 4"
    assert (ckpts / "checkpoint-6" / "adapter_model.safetensors").read_bytes() == b"only 6"
    assert f"completed the interrupted save of {ckpts / 'checkpoint-4'}" in logs
    assert not (ckpts / ".saving").exists()


def test_a_failed_publish_puts_the_earlier_checkpoint_back(tmp_path, monkeypatch):
    staged, final = tmp_path / ".saving" / "checkpoint-4", tmp_path / "checkpoint-4"
    _whole(staged, b"new")
    _whole(final, b"old")
    original = os.replace

    def replace(src, dst):
        if Path(src) == staged:
            raise OSError(errno.EIO, "Input/output error")
        original(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        checkpoints.publish(staged, final)
    assert (final / "adapter_model.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in staged.parent.iterdir()) == ["checkpoint-4"]  # nothing parked left behind


def test_only_a_full_disk_is_reported_as_one(tmp_path, monkeypatch):
    monkeypatch.setattr(disk, "free_bytes", lambda folder: 0)  # the disk is short as well
    cleaned = []
    with pytest.raises(PermissionError):
        with disk.full_disk_as_error(tmp_path, 10**6, "not written", cleanup=lambda: cleaned.append("partial")):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert cleaned == ["partial"]  # the partial result is removed all the same
    with pytest.raises(disk.DiskFullError, match="not written: the disk filled up while writing") as e:
        with disk.full_disk_as_error(tmp_path, 10**6, "not written", cleanup=lambda: cleaned.append("partial")):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(e.value.__cause__, OSError) and cleaned == ["partial", "partial"]


def test_runs_and_merges_share_one_space_check_and_one_size_format(tmp_path, monkeypatch):
    from vlmtune import merge
    from vlmtune.merge import folder as merge_folder

    assert merge.human_size is disk.human_size
    monkeypatch.setattr(disk, "free_bytes", lambda folder: 1000)
    with pytest.raises(disk.DiskFullError) as e:
        merge_folder.check_disk(tmp_path, 10**9)
    assert str(e.value) == (f"the merge was not started: not enough disk space in {tmp_path}: the merged model needs "
                            "about 1.04 GB, 1.00 KB are free; free up space, or choose an --out on a larger disk")


def _decide_on_two_ranks(rank: int, port: int, out: str, report: str) -> None:
    """One of two gloo processes (torch.multiprocessing.spawn): where the run writes and what it resumes."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from vlmtune import run_folder

    if rank == 1:  # rank 0 may be moving files in the folder meanwhile: rank 1 must not look at it
        def looked(*args, **kwargs):
            raise AssertionError("rank 1 looked at the output folder")

        monkeypatch = pytest.MonkeyPatch()
        monkeypatch.setattr(run_folder, "prepare", looked)
        monkeypatch.setattr(checkpoints, "resume_point", looked)
    recipe = vlmtune.load_recipe(None, {"model.name_or_path": "builtin:tiny-qwen2-vl", "data.train": "x.jsonl",
                                        "output_dir": out, "train.resume_from_checkpoint": "latest",
                                        "train.use_cpu": True}, check_paths=False)
    try:
        folder, resume = checkpoints.folder_and_resume(recipe, log=quiet)
        outcome = {"work": str(folder.work), "resume": resume}
    except vlmtune.VlmtuneError as e:
        outcome = {"error": str(e)}
    Path(report, f"rank{rank}.json").write_text(json.dumps(outcome))
    torch.distributed.destroy_process_group()


def test_the_main_process_alone_decides_the_folder_and_resume_point_and_shares_it(tmp_path):
    from vlmtune.distributed import free_port

    out = tmp_path / "run"
    aside = tmp_path / ".run.vlmtune-old"  # a kill between the two renames of an --overwrite's swap
    _whole(aside / "checkpoints" / "checkpoint-2", b"2")
    (aside / "vlmtune.json").write_text("{}")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "mine.txt").write_text("not a run")
    outcomes = []
    for target in (out, tmp_path / "foreign"):
        report = tmp_path / f"report-{target.name}"
        report.mkdir()
        torch.multiprocessing.spawn(_decide_on_two_ranks, args=(free_port(), str(target), str(report)), nprocs=2)
        outcomes.append([json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)])
    restored = {"work": str(out), "resume": str(out / "checkpoints" / "checkpoint-2")}
    assert outcomes[0] == [restored, restored] and not aside.exists()
    (refused, same) = outcomes[1]
    assert "holds no vlmtune run (mine.txt)" in refused["error"] and same == refused


@pytest.mark.slow
def test_kill_9_between_a_publishs_renames_then_resume_latest(data, tmp_path):
    """checkpoint-4 saved again (a resume from checkpoint-2), killed with the earlier copy parked: resume finishes
    the publish, and the run, at its last step, writes its outputs from the new checkpoint-4."""
    out = tmp_path / "run"
    steps = {"train.max_steps": 4, "train.save_steps": 2}
    vlmtune.train(recipe_at(out, data, **steps), log=quiet)
    (out / "vlmtune.json").unlink()  # as a run whose final write failed leaves it
    ckpts = out / "checkpoints"
    recipe = recipe_file(tmp_path, data, max_steps=4, save_steps=2, logging_steps=1)
    proc = _worker("--kill-publishing", 4, "--", "sft", recipe, f"output_dir={out}",
                   f"train.resume_from_checkpoint={ckpts / 'checkpoint-2'}")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not (ckpts / "checkpoint-4").exists()
    assert checkpoints.is_complete(ckpts / ".saving" / "checkpoint-4")
    assert checkpoints.is_complete(ckpts / ".saving" / "checkpoint-4.replaced")

    logs = []
    result = vlmtune.train(recipe_at(out, data, **steps, **{"train.resume_from_checkpoint": "latest"}),
                           log=logs.append)
    assert f"completed the interrupted save of {ckpts / 'checkpoint-4'}" in logs
    assert f"resuming from {ckpts / 'checkpoint-4'}" in logs
    assert result.metrics["global_step"] == 4 and (out / "vlmtune.json").is_file()
    assert not (ckpts / ".saving").exists()
