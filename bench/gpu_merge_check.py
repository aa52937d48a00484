"""GPU check for merge-adapter: train a LoRA and a QLoRA adapter a few steps on the Qwen2-VL-2B architecture
(random bf16 weights, real tokenizer), merge each into the full-precision base with the parity check, record
time, peak memory and the check's figures.

    python bench/gpu_merge_check.py [--steps 5] [--out bench/results/gpu-merge-qwen2-vl-2b.json]

Runs on the CPU too with --arch tiny (a smoke test of the script itself).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import train_throughput as tt  # noqa: E402  (model folder and data builders shared with the throughput bench)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=("tiny", "qwen2-vl-2b"), default="qwen2-vl-2b")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/vlmtune-merge-check"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu-merge-qwen2-vl-2b.json")
    args = ap.parse_args()
    import torch

    import vlmtune

    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    model_dir, data_dir = work / "model", work / "data"
    tt.build_model_dir(args.arch, model_dir, tt.DEFAULT_REFERENCE, tt.DEFAULT_TOKENIZER_REFERENCE, seed=0)
    from transformers import AutoTokenizer

    tt.make_data(data_dir, AutoTokenizer.from_pretrained(model_dir), 16, args.image_size, seed=0)
    report = {"name": f"merge-adapter check, {args.arch}", "date": tt._now(), "device": tt._device_name(),
              "versions": tt._versions(), "steps": args.steps, "runs": {}}
    for quant in ("none", "4bit"):
        run = work / f"run-{quant}"
        recipe = vlmtune.load_recipe(None, overrides={
            "model.name_or_path": str(model_dir), "data.train": str(data_dir / "train.jsonl"),
            "quantization.mode": quant, "train.max_steps": args.steps, "train.per_device_train_batch_size": 4,
            "train.gradient_accumulation_steps": 1, "train.learning_rate": 1e-3, "train.save_steps": 10_000,
            "train.logging_steps": 1, "data.max_length": 4096, "output_dir": str(run)})
        t0 = time.perf_counter()
        vlmtune.train(recipe)
        trained = time.perf_counter() - t0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = vlmtune.merge_adapter(run, work / f"merged-{quant}", dtype="bf16", check=True)
        merged = time.perf_counter() - t0
        report["runs"][quant] = {
            "train_seconds": round(trained, 1), "merge_seconds_with_check": round(merged, 1),
            "merged_modules": result.merged_modules, "num_shards": result.num_shards,
            "merged_bytes": result.total_bytes, "check": result.check, "notes": result.notes,
            "peak_gpu_memory_bytes_during_merge": torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else None,
            "peak_rss_bytes_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        print(json.dumps(report["runs"][quant], indent=2, default=str))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
