"""The throughput benchmark: its FLOP model and arm settings (fast), and a three-arm run on the tiny model (slow)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "train_throughput.py"
REFERENCE = ROOT.parent / "shared" / "reference" / "qwen2_vl_2b" / "config.json"
sys.path.insert(0, str(ROOT / "bench"))

from throughput import arms, flops  # noqa: E402
from throughput.cli import packing_plan  # noqa: E402
from throughput.model import SMALL_TEXT, SMALL_VISION  # noqa: E402

ARM_FIELDS = ("train_examples", "samples_per_second", "samples_per_cpu_second", "cpu_seconds",
              "supervised_tokens_per_second", "non_pad_tokens_per_second", "padding_fraction", "supervised_fraction",
              "tokens_per_sample", "epoch_seconds", "epoch_samples_per_second",
              "epoch_2_over_1_speedup", "vision_tower_calls", "vision_tower_calls_per_epoch", "peak_rss_bytes",
              "peak_gpu_memory_bytes", "train_seconds", "wall_seconds", "model_flops_per_second", "mfu",
              "load_average_before")


def _spread_samples(n=200):
    """Token counts shaped like the benchmark's data at 448 px (log-uniform questions, 1-3 images)."""
    import math
    import random

    rng = random.Random(0)
    sides = list(range(112, 449, 28))
    out = []
    for _ in range(n):
        patches = [(rng.choice(sides) // 14) * (rng.choice(sides) // 14) for _ in range(rng.randint(1, 3))]
        answer = int(math.exp(rng.uniform(math.log(4), math.log(160))))
        tokens = int(math.exp(rng.uniform(math.log(16), math.log(1000)))) + answer + 20 + sum(p // 4 for p in patches)
        out.append({"tokens": tokens, "supervised": answer + 1, "patches": patches})
    return out


@pytest.mark.skipif(not REFERENCE.is_file(), reason="no Qwen2-VL-2B reference config")
def test_small_model_keeps_the_2b_flop_shares():
    small = {**SMALL_TEXT, "vision_config": SMALL_VISION}
    shares = flops.compare(small, json.loads(REFERENCE.read_text()), _spread_samples())
    for step in ("plain_step", "labels_only_step"):
        assert shares[step]["max_share_difference_points"] < 3.0, shares[step]
    assert shares["plain_step"]["reference"]["vision_tower"] > 0.2  # the vision tower matters at this data
    assert 10e6 < sum(shares["small_parameters"].values()) < 100e6


def test_flop_model_counts():
    config = {**SMALL_TEXT, "vision_config": SMALL_VISION}
    one = [{"tokens": 100, "supervised": 10, "patches": [64]}]
    full, labels_only = flops.step_flops(config, one), flops.step_flops(config, one, labels_only=True)
    assert labels_only["lm_head"] == pytest.approx(full["lm_head"] / 10)
    assert labels_only["vision_tower"] == full["vision_tower"] > 0
    td = flops.text_dims(config)
    assert flops.decoder_flops(td, 100, checkpointing=True) > flops.decoder_flops(td, 100)
    assert flops.mfu_flops(config, one) > 4 * flops.decoder_parameters(td) * 100


def test_fast_arm_skips_fields_the_schema_lacks(monkeypatch):
    import importlib

    schema_module = importlib.import_module("vlmtune.config.schema")  # vlmtune.config.schema is also a function

    known = {k: v for k, v in schema_module.schema().items() if k != "train.cache_vision_features"}
    monkeypatch.setattr(schema_module, "schema", lambda: known)
    spec = {"arm": "vlmtune-fast", "gradient_checkpointing": "default", "pack_capacity": 1024, "packed_batch_size": 2}
    fields, skipped = arms.arm_fields(spec)
    assert "train.cache_vision_features" in skipped and "train.cache_vision_features" not in fields
    assert fields["train.packing"] is True and fields["data.cache"] is True
    assert fields["data.max_length"] == 1024 and fields["train.per_device_train_batch_size"] == 2
    assert arms.arm_fields({**spec, "arm": "vlmtune"}) == ({}, [])


def test_packing_plan_fits_the_longest_sample():
    samples = [{"tokens": t} for t in (100, 200, 900, 300)]
    capacity, rows = packing_plan(samples, batch_size=8)
    assert capacity >= 900 + 16 and capacity % 64 == 0
    assert rows == max(1, round(8 * 375 / capacity))


@pytest.mark.slow
def test_three_arms_tiny_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    cmd = [sys.executable, str(SCRIPT), "--arch", "tiny", "--image-size", "84", "--epochs", "2", "--batch-size", "2",
           "--num-samples", "4", "--torch-threads", "1", "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "| vlmtune-fast/trl |" in proc.stdout

    rep = json.loads(out.read_text())
    assert set(rep["arms"]) == set(arms.ARMS)
    assert rep["device"] and rep["date"] and rep["machine"]["cpu_count"]
    assert {"torch", "transformers", "trl", "peft", "datasets", "vlmtune"} <= set(rep["versions"])
    assert set(rep["flop_shares"]["plain_step"]["small"]) == {"vision_tower", "decoder_layers", "lm_head"}
    assert rep["settings"]["vlmtune_fast"]["skipped_fields"] is not None
    for arm, fig in rep["arms"].items():
        assert "error" not in fig, (arm, fig)
        assert set(ARM_FIELDS) <= set(fig), (arm, set(ARM_FIELDS) - set(fig))
        for key in ("samples_per_second", "supervised_tokens_per_second", "train_seconds", "peak_rss_bytes"):
            assert fig[key] > 0, (arm, key, fig[key])
        assert len(fig["epoch_seconds"]) == 2 and 0 <= fig["padding_fraction"] < 1
        assert fig["tokens_per_sample"] == pytest.approx(rep["arms"]["trl"]["tokens_per_sample"], rel=0.1)
        effective = rep["raw"][arm]["effective"]
        assert effective["lora_modules"] > 0 and effective["lora_modules_in_vision"] == 0
    trl, fast = rep["arms"]["trl"], rep["arms"]["vlmtune-fast"]
    assert trl["vision_tower_calls_per_epoch"] == [2, 2]  # one call per batch of 2, two batches per epoch
    assert trl["supervised_fraction"] == pytest.approx(1.0, abs=0.02)  # TRL supervises every non-pad token
    assert fast["supervised_fraction"] < trl["supervised_fraction"]
    assert fast["padding_fraction"] < trl["padding_fraction"]
    assert set(rep["ratios"]) == {"vlmtune-fast/trl", "vlmtune/trl", "vlmtune-fast/vlmtune"}
    assert set(rep["goals"]) == {"same_examples_in_every_arm", "fast_over_trl_samples_per_second",
                                 "fast_peak_memory_not_above_trl", "fast_epoch_2_over_1"}
    assert rep["goals"]["same_examples_in_every_arm"]["met"], rep["goals"]
    summary = subprocess.run([sys.executable, str(ROOT / "bench" / "summarize.py"), str(out)], capture_output=True,
                             text=True, cwd=ROOT, timeout=60)
    assert summary.returncode == 0 and "vlmtune-fast: MFU" in summary.stdout, summary.stderr


def test_dpo_method_runs_the_dpo_benchmark_with_the_same_settings(monkeypatch, tmp_path):
    import dpo_throughput
    from throughput import cli

    seen = []
    monkeypatch.setattr(dpo_throughput, "main", lambda argv: seen.append(argv) or 0)
    out = tmp_path / "dpo.json"
    assert cli.main(["--method", "dpo", "--num-samples", "16", "--epochs", "1", "--batch-size", "4",
                     "--out", str(out)]) == 0
    assert seen == [["--pairs", "16", "--epochs", "1", "--batch-size", "4", "--gradient-checkpointing", "default",
                     "--out", str(out)]]
    with pytest.raises(SystemExit):
        cli.parse_args(["--method", "dpo", "--arch", "small-qwen2-vl"])
