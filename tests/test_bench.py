"""The throughput benchmark runs end to end on the tiny model and reports both arms."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "train_throughput.py"


@pytest.mark.slow
def test_tiny_smoke_benchmark(tmp_path):
    out = tmp_path / "smoke.json"
    cmd = [sys.executable, str(SCRIPT), "--arch", "tiny", "--image-size", "56", "--steps", "6", "--warmup-steps", "2",
           "--batch-size", "4", "--num-samples", "32", "--torch-threads", "1", "--work-dir", str(tmp_path / "work"),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "| vlmtune/trl |" in proc.stdout

    report = json.loads(out.read_text())
    assert set(report["arms"]) == {"trl", "vlmtune"}
    assert report["timing"]["basis"] == "steady"
    assert report["device"] and report["date"]
    assert {"torch", "transformers", "trl", "peft", "datasets", "vlmtune"} <= set(report["versions"])
    for arm, fig in report["arms"].items():
        assert "error" not in fig, (arm, fig)
        for key in ("samples_per_second", "tokens_per_second", "supervised_tokens_per_second", "supervised_fraction",
                    "wall_seconds", "measured_seconds", "peak_rss_bytes"):
            assert fig[key] > 0, (arm, key, fig[key])
        assert fig["supervised_fraction"] <= 1.0
        effective = report["raw"][arm]["effective"]
        assert effective["lora_modules"] > 0 and effective["lora_modules_in_vision"] == 0
    trl, vlm = report["arms"]["trl"], report["arms"]["vlmtune"]
    # TRL's collator supervises every non-pad token by default; vlmtune only the assistant replies.
    assert trl["supervised_fraction"] == pytest.approx(1.0)
    assert vlm["supervised_fraction"] < trl["supervised_fraction"]
    # Same data and chat layout: both arms see the same number of tokens per sample, and train the same LoRA.
    assert vlm["tokens_per_sample"] == pytest.approx(trl["tokens_per_sample"], rel=0.05)
    assert (report["raw"]["trl"]["effective"]["trainable_parameters"]
            == report["raw"]["vlmtune"]["effective"]["trainable_parameters"])
    ratios = report["ratios_vlmtune_over_trl"]
    assert ratios["samples_per_second"] > 0 and ratios["supervised_fraction"] < 1
