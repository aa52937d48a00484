"""Training throughput: TRL's documented SFTTrainer VLM recipe beside vlmtune (defaults) and vlmtune-fast
(every switch of issue 10), on the same data with the same LoRA, each arm in its own process:

    python bench/train_throughput.py --arch small-qwen2-vl --epochs 2 --num-samples 64 --torch-threads 1 \
        --out bench/results/cpu-small-qwen2-vl.json
    python bench/train_throughput.py --arch qwen2-vl-2b --quant none --out bench/results/gpu-bf16.json

The code lives in bench/throughput/ (data.py, model.py, flops.py, probes.py, arms.py, report.py, cli.py);
bench/README.md says what each figure means. Internal entry points (used by the parent process):
`_prepare SPEC.json` and `_arm SPEC.json`. The names below are also used by the GPU check scripts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput.arms import ARMS, LORA, TRL_TARGET_REGEX, run_arm, write_recipe  # noqa: E402
from throughput.cli import main  # noqa: E402
from throughput.common import (  # noqa: E402
    DEFAULT_REFERENCE,
    DEFAULT_TOKENIZER_REFERENCE,
    GIB,
    HERE,
    ROOT,
    cpu_name,
    device_name,
    now,
    peak_rss,
    read_json,
    versions,
    write_json,
)
from throughput.data import cmd_prepare, make_data, trl_dataset  # noqa: E402
from throughput.model import build_model_dir  # noqa: E402

# the helper names the GPU check scripts import (bench/gpu_merge_check.py, gpu_reliability_check.py,
# tests/gpu_deepspeed_check.py)
_now, _cpu_name, _device_name, _versions, _read_json, _write_json = now, cpu_name, device_name, versions, read_json, write_json

__all__ = ["ARMS", "DEFAULT_REFERENCE", "DEFAULT_TOKENIZER_REFERENCE", "GIB", "HERE", "LORA", "ROOT",
           "TRL_TARGET_REGEX", "build_model_dir", "cmd_arm", "cmd_prepare", "main", "make_data", "trl_dataset",
           "write_recipe"]


def cmd_arm(spec: dict) -> int:
    start = time.perf_counter()
    if spec.get("torch_threads"):
        import torch

        torch.set_num_threads(spec["torch_threads"])
    result = run_arm(spec)
    result["peak_rss_bytes"] = peak_rss()  # before anything below forks (platform.processor runs `uname -p`)
    result["process_seconds_in_arm"] = time.perf_counter() - start
    result["device"] = device_name()
    result["versions"] = versions()
    write_json(Path(spec["result"]), result)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("_prepare", "_arm"):
        spec = read_json(Path(sys.argv[2]))
        sys.exit(cmd_prepare(spec) if sys.argv[1] == "_prepare" else cmd_arm(spec))
    sys.exit(main())
