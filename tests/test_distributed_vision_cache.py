"""The frozen-vision feature cache under two DeepSpeed ZeRO-2 processes on the CPU (gloo): rank 0 runs the pre-pass and
writes the entries while rank 1 waits, then both train from the same folder. The losses equal an uncached run's
on two processes, and neither rank runs its vision tower in training: not for the cached images, and not for the
dummy image that otherwise keeps a text-only batch's rank in step (distributed/zero3.py)."""

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


def _run(folder, data, setting: str):
    folder.mkdir()
    proc, _, _, ranks = run_worker(folder, data, "distributed.deepspeed=zero2", "distributed.num_processes=2",
                                   "train.max_steps=2", f"train.cache_vision_features={setting}", "data.cache=false")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert len(ranks) == 2 and all(r["world_size"] == 2 for r in ranks)
    return proc, ranks


def _losses(rank: dict) -> list[float]:
    return [h["loss"] for h in rank["log_history"] if "loss" in h]


@pytest.mark.slow
def test_two_processes_train_from_rank_0s_cache_as_without_it(data, shm_op_built, tmp_path):  # noqa: F811
    _, plain = _run(tmp_path / "plain", data, "false")
    assert all(r["vision_cache"]["vision_tower_calls_in_training"] > 0 for r in plain)
    assert plain[1]["dummy_calls"] >= 1  # the text-only rank ran the dummy image: what the cached run must not
    proc, cached = _run(tmp_path / "cached", data, "true")
    assert proc.stdout.count("vision feature cache: 0 entries reused, 4 computed") == 1  # rank 0 built it alone
    m0, m1 = cached[0]["vision_cache"], cached[1]["vision_cache"]
    assert m0["vision_cache"] and m1["vision_cache"] and m0["vision_cache_misses"] == m1["vision_cache_misses"] == 4
    assert m0["vision_cache_written_bytes"] == m1["vision_cache_written_bytes"] > 0  # rank 0's, told to rank 1
    assert m0["vision_tower_calls"] == 4 and m1["vision_tower_calls"] == 0  # rank 0's pre-pass, once per image row
    assert m0["vision_tower_calls_in_training"] == m1["vision_tower_calls_in_training"] == 0
    assert all(r["dummy_calls"] == 0 for r in cached)
    assert m0["vision_cache_bytes"] == m1["vision_cache_bytes"] > 0  # one folder, read by both
    assert len(_losses(cached[0])) == 2
    assert _losses(cached[0]) == pytest.approx(_losses(plain[0]), rel=1e-5)
