"""The frozen-vision feature cache under two DeepSpeed ZeRO-2 processes on the CPU (gloo): rank 0 decides what is
missing, each rank builds a share of it, then both train from the same folder. The losses equal an uncached run's
on two processes, and neither rank runs its vision tower in training: not for the cached images, and not for the
dummy image that otherwise keeps a text-only batch's rank in step (distributed/zero3.py). A cache folder the ranks
do not share (one $VLMTUNE_CACHE per rank, as nodes with their own disks) and a rank whose writes fail are refused
on both ranks (tests/vision_cache_worker.py)."""

from __future__ import annotations

import json

import pytest

from .test_deepspeed import SHAPES, TEXT_ONLY, run_worker, shm_op_built  # noqa: F401 (a fixture)

pytestmark = pytest.mark.multiprocess  # several processes (torchrun / DeepSpeed): make test-multiprocess

pytest.importorskip("deepspeed")

# 2 ranks x 2 rows a step, rows in file order: step 1 gives rank 1 a text-only batch, step 2 the same to rank 0
PATTERN = "IITTTTII"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = iter((SHAPES / "train.jsonl").read_text().splitlines())
    path = tmp_path_factory.mktemp("dvc") / "train.jsonl"
    path.write_text("\n".join(next(rows) if c == "I" else json.dumps(TEXT_ONLY) for c in PATTERN) + "\n")
    return path


def _launch(folder, data, setting: str, **env):
    folder.mkdir()
    return run_worker(folder, data, "distributed.deepspeed=zero2", "distributed.num_processes=2", "train.max_steps=2",
                      f"train.cache_vision_features={setting}", "data.cache=false", env_extra=env,
                      worker="vision_cache_worker.py")


def _run(folder, data, setting: str):
    proc, _, _, ranks = _launch(folder, data, setting)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert len(ranks) == 2 and all(r["world_size"] == 2 for r in ranks)
    return proc, ranks


def _losses(rank: dict) -> list[float]:
    return [h["loss"] for h in rank["log_history"] if "loss" in h]


@pytest.mark.slow
def test_two_processes_build_shares_of_the_cache_and_train_as_without_it(data, shm_op_built, tmp_path):  # noqa: F811
    _, plain = _run(tmp_path / "plain", data, "false")
    assert all(r["vision_cache"]["vision_tower_calls_in_training"] > 0 for r in plain)
    assert plain[1]["dummy_calls"] >= 1  # the text-only rank ran the dummy image: what the cached run must not
    proc, cached = _run(tmp_path / "cached", data, "true")
    assert proc.stdout.count("vision feature cache: 0 entries reused, 4 computed (2 + 2 by 2 processes)") == 1
    assert "caching vision features (rank 1 of 2)" in proc.stderr  # each rank's progress bar, over its share
    m0, m1 = cached[0]["vision_cache"], cached[1]["vision_cache"]
    assert m0["vision_cache"] and m1["vision_cache"] and m0["vision_cache_misses"] == m1["vision_cache_misses"] == 4
    assert m0["vision_cache_written_bytes"] == m1["vision_cache_written_bytes"] > 0  # both ranks' writes, summed
    # each rank's pre-pass encoded its share, once per unique image row: 4 in all
    assert m0["vision_tower_calls"] > 0 and m1["vision_tower_calls"] > 0
    assert m0["vision_tower_calls"] + m1["vision_tower_calls"] == 4
    assert m0["vision_tower_calls_in_training"] == m1["vision_tower_calls_in_training"] == 0
    assert all(r["dummy_calls"] == 0 for r in cached)
    assert m0["vision_cache_bytes"] == m1["vision_cache_bytes"] > 0  # one folder, read by both
    assert len(_losses(cached[0])) == 2
    assert _losses(cached[0]) == pytest.approx(_losses(plain[0]), rel=1e-5)


def _errors(proc, text: str) -> int:
    """How many ranks said `text` in their error line (each rank prints its own, naming itself)."""
    lines = proc.stderr.splitlines()
    return sum(any(x.startswith(f"rank {r} (host ") and ": error: " in x and text in x for x in lines) for r in (0, 1))


@pytest.mark.slow
def test_an_unshared_cache_folder_or_a_failed_write_stops_both_ranks(data, shm_op_built, tmp_path):  # noqa: F811
    proc, _, _, ranks = _launch(tmp_path / "unshared", data, "true",
                                VLMTUNE_PROBE_CACHE_PER_RANK=str(tmp_path / "node-disks"))
    assert proc.returncode != 0 and not ranks, proc.stderr[-6000:]  # no rank trained
    said = "vision feature cache: the processes do not share one cache folder"
    assert _errors(proc, said) == 2, proc.stderr[-6000:]
    line = next(x for x in proc.stderr.splitlines() if said in x)
    assert "rank 0 (host " in line and "rank 1 (host " in line and "lacks 2 of 4" in line, line
    assert str(tmp_path / "node-disks" / "rank0" / "vision") in line and "rank1" in line, line
    assert "set $VLMTUNE_CACHE to a path on a shared filesystem, or set train.cache_vision_features: false" in line

    proc, _, _, ranks = _launch(tmp_path / "failed", data, "true", VLMTUNE_PROBE_FAIL_WRITE_RANK="1")
    assert proc.returncode != 0 and not ranks, proc.stderr[-6000:]
    said = "vision feature cache: the pre-pass failed on rank 1 (host "
    assert _errors(proc, said) == 2, proc.stderr[-6000:]
    assert _errors(proc, "OSError: [Errno 28] No space left on device") == 2

    # rank 0's first write, which measures the cache's size before the ranks split the rest
    proc, _, _, ranks = _launch(tmp_path / "failed-0", data, "true", VLMTUNE_PROBE_FAIL_WRITE_RANK="0")
    assert proc.returncode != 0 and not ranks, proc.stderr[-6000:]
    assert _errors(proc, "vision feature cache: the pre-pass failed on rank 0 (host ") == 2, proc.stderr[-6000:]
