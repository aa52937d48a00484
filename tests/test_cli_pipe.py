"""`vlmtune inspect ... | head`: a reader that stops early ends the command quietly, without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_closed_pipe_ends_the_command_quietly():
    from vlmtune.demo import builtin_model_path

    builtin_model_path("tiny-qwen2-vl")  # built here: building it logs to stdout from a library, not from vlmtune
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is printed, as `| head -1` soon is
    try:
        proc = subprocess.run([sys.executable, "-m", "vlmtune.cli", "inspect", str(ROOT / "recipes" / "tiny-demo.yaml"),
                               "--num", "2"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    finally:
        os.close(write)
    assert proc.returncode in (0, 141), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr[-3000:]
