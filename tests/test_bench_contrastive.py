"""The contrastive benchmark (bench/contrastive_throughput.py): both arms on the tiny CLIP and SigLIP, 2 steps."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "contrastive_throughput.py"
ARM_FIELDS = ("steps", "samples", "samples_per_second", "steady_samples_per_second", "median_step_samples_per_second",
              "fastest_step_samples_per_second", "train_seconds", "wall_seconds",
              "step_seconds", "peak_rss_bytes", "peak_gpu_memory_bytes", "final_loss", "trainable_parameters")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_both_arms_train_the_same_samples_and_report_every_field(family, tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", "tiny", "--family", family, "--steps", "2",
                           "--batch-size", "3", "--image-size", "48", "--torch-threads", "1",
                           "--work-dir", str(tmp_path / "work"), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    plain, tuned = report["arms"]["plain"], report["arms"]["vlmtune"]
    for arm in (plain, tuned):
        assert set(ARM_FIELDS) <= set(arm), set(ARM_FIELDS) - set(arm)
        assert arm["steps"] == 2 and len(arm["step_seconds"]) == 2
        assert arm["samples_per_second"] > 0 and arm["peak_rss_bytes"] > 0
        assert math.isfinite(arm["final_loss"])
    # the same work: 2 steps of 3 pairs (vlmtune's default accumulation of 8 batches would train more)
    assert plain["samples"] == tuned["samples"] == 6
    assert plain["trainable_parameters"] == tuned["trainable_parameters"] > 0
    assert report["same_work"] == {"steps": True, "samples": True, "trainable_parameters": True}
    assert set(report["ratios"]) >= {"samples_per_second", "wall_seconds", "peak_rss_bytes"}
    assert report["ratios"]["samples_per_second"] == pytest.approx(
        tuned["samples_per_second"] / plain["samples_per_second"])
    assert {"torch", "transformers", "peft", "vlmtune"} <= set(report["versions"])
    assert report["device"] and report["settings"]["family"] == family
    assert report["settings"]["batch_size"] == 3 and report["settings"]["steps"] == 2
    params = report["model"]["parameters"]
    assert params["total"] > params["vision_tower"] > 0 and params["text_tower"] > 0
