"""The GPU reliability check script runs end to end on the CPU (--cpu), its fp16 checks recorded as skipped."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_reliability_check.py"
CPU_CHECKS = {"bad_samples_mid_run", "nan_loss_stops_unsaved", "atomic_checkpoints_and_resume"}
FP16_CHECKS = {"fp16_scaler_overflow_not_counted", "nan_loss_stops_unsaved_fp16", "atomic_checkpoints_and_resume_fp16"}


@pytest.mark.slow
def test_every_cpu_check_passes_and_the_fp16_ones_are_skipped(tmp_path):
    out = tmp_path / "reliability.json"
    cmd = [sys.executable, str(SCRIPT), "--cpu", "--torch-threads", "1", "--work-dir", str(tmp_path / "work"),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    report = json.loads(out.read_text())
    checks = report["checks"]
    assert set(checks) == CPU_CHECKS | FP16_CHECKS
    failed = {name: c.get("failures") for name, c in checks.items() if c["status"] != "pass" and name in CPU_CHECKS}
    assert not failed, failed
    assert all(checks[name]["status"] == "skipped" and "CUDA" in checks[name]["reason"] for name in FP16_CHECKS)
    assert report["all_passed"] is True and report["settings"] == {"cpu": True, "dtype": "float32",
                                                                  "models": ["builtin:tiny-qwen2-vl",
                                                                             "builtin:tiny-llava"]}
    assert {"torch", "transformers", "trl", "peft"} <= set(report["versions"]) and report["device"]
    assert "cuda_device" in report and all(checks[name]["seconds"] > 0 for name in CPU_CHECKS)
    bad = checks["bad_samples_mid_run"]["measured"]
    assert bad["bad_sample_count"] == 2 and bad["epochs"] == 2 and bad["num_workers"] == 2
    resumed = checks["atomic_checkpoints_and_resume"]["measured"]
    assert resumed["steps_trained_on_resume"] == [3, 4]
    assert resumed["after_resume"]["entries"] == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert checks["nan_loss_stops_unsaved"]["measured"]["adapter_written"] is False
