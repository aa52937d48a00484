"""Bad samples under two DeepSpeed processes on the CPU: every rank skips, counts and stops together (both runs
in one launch; the one that stops comes last, as it ends the launch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from .launch_scenarios import Scenario, launch, selected  # noqa: E402
from .test_bad_samples import truncate  # noqa: E402
from .test_deepspeed import SHAPES, sft_recipe, shm_op_built  # noqa: E402, F401 (a fixture)

pytestmark = pytest.mark.multiprocess  # several processes (torchrun / DeepSpeed): make test-multiprocess


def two_rank_data(folder: Path, bad: list[int]) -> Path:
    """12 one-image rows; rows at the 0-based indices in `bad` have lost their pixels (their headers still read).

    With 2 ranks, 2 rows a batch and sequential sampling, step k gives rows 4k, 4k+1 to rank 0 and 4k+2, 4k+3
    to rank 1 (tests/test_deepspeed.py)."""
    rows = (SHAPES / "train.jsonl").read_text().splitlines()[:12]
    (folder / "images").mkdir(parents=True)
    for k, line in enumerate(rows):
        for part in (p for turn in json.loads(line)["messages"] if isinstance(turn["content"], list)
                     for p in turn["content"] if p["type"] == "image"):
            target = folder / part["image"]
            target.write_bytes((SHAPES / part["image"]).read_bytes())
            if k in bad:
                truncate(target)
    path = folder / "train.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


# step 1 of "skip": one bad row of rank 1's two; step 2: both of rank 0's rows bad (a placeholder batch beside rank
# 1's images: under ZeRO-3 its dummy image keeps the ranks' gathers in step)
RUNS = {"skip": ([2, 4, 5], ("distributed.deepspeed=zero3",)),
        "stop": ([2], ("distributed.deepspeed=zero2", "data.max_bad_samples=0"))}


@pytest.fixture(scope="module")
def runs(request, shm_op_built, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("bad-runs")
    scenarios, data = [], {}
    for name in selected(request, list(RUNS)):
        bad, overrides = RUNS[name]
        folder = root / name
        data[name] = two_rank_data(folder / "data", bad)
        argv = ["sft", str(sft_recipe(folder, data[name])), "distributed.num_processes=2",
                f"data.image_root={folder / 'data'}", "data.check_images=header", *overrides]
        scenarios.append(Scenario(name, argv, folder / "out"))
    return data, launch(root, scenarios, timeout=900)


@pytest.mark.slow
@pytest.mark.scenario("skip")
def test_two_ranks_skip_bad_samples_and_rank_0_reports_both_ranks(runs):
    data, run = runs[0]["skip"], runs[1]["skip"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    saved = json.loads((run.out / "train_results.json").read_text())
    assert saved["bad_sample_count"] == 3
    assert sorted(b["source"] for b in saved["bad_samples"]) == [f"{data}:{k}" for k in (3, 5, 6)]
    assert run.stdout.count("skipped bad sample") == 3  # rank 0 names rank 1's too, each once


@pytest.mark.slow
@pytest.mark.scenario("stop")
def test_two_ranks_stop_together_past_the_limit(runs):
    data, run = runs[0]["stop"], runs[1]["stop"]
    assert run.returncode != 0
    assert "more than data.max_bad_samples=0" in run.stderr and f"{data}:3: image cannot be decoded" in run.stderr
    assert (run.out / "checkpoints" / "checkpoint-1").is_dir()  # saved by both ranks together, then both stopped
    assert not (run.out / "adapter_model.safetensors").exists()
