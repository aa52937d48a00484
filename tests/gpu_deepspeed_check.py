"""GPU check for DeepSpeed ZeRO through `vlmtune sft` (issue 5), on the Qwen2-VL-2B architecture.

Runs, each as `python -m vlmtune.cli sft recipe.yaml distributed.deepspeed=...` in its own process on every
local GPU: LoRA + ZeRO-2, LoRA + ZeRO-3, QLoRA + ZeRO-2, QLoRA + ZeRO-3 (and LoRA + ZeRO-3 offload), a few
steps each; then checks that the saved adapter is non-empty and reloads onto the base model, and writes
samples/s and peak GPU memory per run to one JSON (bench/results/ when collected).

The model folder (random bf16 weights, real tokenizer) and the data are built by bench/train_throughput.py's
own preparation (see bench/README.md). `--arch tiny` runs the same on the builtin tiny model (CPU smoke test).

    python3 tests/gpu_deepspeed_check.py --out $OUT/gpu-deepspeed-qwen2-vl-2b.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

RUNS = [("lora-zero2", "none", "zero2"), ("lora-zero3", "none", "zero3"), ("qlora-zero2", "4bit", "zero2"),
        ("qlora-zero3", "4bit", "zero3"), ("lora-zero3-offload", "none", "zero3_offload")]


def reload_check(model_dir: Path, adapter: Path) -> dict:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    weights = load_file(adapter / "adapter_model.safetensors")
    sizes = [t.numel() for t in weights.values()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]], device=device)
    with torch.no_grad():
        before = base(input_ids=ids).logits.float()
        after = PeftModel.from_pretrained(base, adapter).to(device)(input_ids=ids).logits.float()
    return {"tensors": len(sizes), "empty_tensors": sum(1 for n in sizes if n == 0), "parameters": sum(sizes),
            "lora_B_nonzero": any("lora_B" in k and bool(t.abs().max() > 0) for k, t in weights.items()),
            "logits_changed": bool((before - after).abs().max() > 0)}


def main() -> int:
    import train_throughput as tt

    p = argparse.ArgumentParser()
    p.add_argument("--arch", choices=("tiny", "qwen2-vl-2b"), default="qwen2-vl-2b")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--runs", default=",".join(r[0] for r in RUNS))
    p.add_argument("--work-dir", type=Path, default=Path(os.environ.get("BENCH_WORK", "/tmp/vlmtune-bench")))
    p.add_argument("--run-timeout", type=float, default=240)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu-deepspeed-qwen2-vl-2b.json")
    args = p.parse_args()

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir = work / f"model-{args.arch}", work / f"data-{args.arch}-n{args.num_samples}-px{args.image_size}"
    prep = {"arch": args.arch, "seed": 0, "reference": str(tt.DEFAULT_REFERENCE.resolve()),
            "tokenizer_reference": str(tt.DEFAULT_TOKENIZER_REFERENCE.resolve()), "model_dir": str(model_dir),
            "data_dir": str(data_dir), "num_samples": args.num_samples, "image_size": args.image_size, "data_seed": 0}
    t0 = time.perf_counter()
    tt.cmd_prepare(prep)
    pixels = tt._read_json(data_dir / "bench-data.json")["info"]["pixels"]
    report = {"what": "vlmtune sft with distributed.deepspeed on every local GPU", "arch": args.arch,
              "versions": tt._versions(), "device": tt._device_name(), "prepare_seconds": time.perf_counter() - t0,
              "batch_size": args.batch_size, "steps": args.steps, "image_size": args.image_size, "runs": {}}
    wanted = set(args.runs.split(","))
    for name, quant, ds in RUNS:
        if name not in wanted:
            continue
        run_dir = work / "ds-runs" / name
        spec = {"model_dir": str(model_dir), "data_dir": str(data_dir), "run_dir": str(run_dir / "output"),
                "quant": quant, "steps": args.steps, "batch_size": args.batch_size, "learning_rate": 1e-4,
                "gradient_checkpointing": True, "seed": 0, "num_workers": None, **pixels}
        recipe = tt.write_recipe(spec, run_dir / "recipe.yaml")
        cmd = [sys.executable, "-m", "vlmtune.cli", "sft", str(recipe), f"distributed.deepspeed={ds}"]
        if quant == "4bit":
            cmd.append("quantization.compute_dtype=" + ("bfloat16" if args.arch != "tiny" else "float32"))
        print(f"[{name}] {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.run_timeout, cwd=ROOT)
            rc, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, log = 124, f"timed out after {args.run_timeout}s\n{e.stdout or ''}{e.stderr or ''}"
        (run_dir / "run.log").write_text(log if isinstance(log, str) else str(log))
        entry = {"returncode": rc, "wall_seconds": time.perf_counter() - start, "command": cmd[2:]}
        out = run_dir / "output"
        if rc == 0:
            m = json.loads((out / "train_results.json").read_text())
            entry.update({k: m.get(k) for k in ("train_samples_per_second", "train_runtime", "train_loss",
                                                "global_step", "peak_gpu_memory_bytes")})
            if m.get("peak_gpu_memory_bytes"):
                entry["peak_gpu_memory_gib"] = m["peak_gpu_memory_bytes"] / 2**30
            entry["metadata_distributed"] = json.loads((out / "vlmtune.json").read_text()).get("distributed")
            try:
                entry["adapter"] = reload_check(model_dir, out)
            except Exception as e:  # reported, not raised: the other runs still go
                entry["adapter"] = {"error": f"{e.__class__.__name__}: {e}"}
        else:
            entry["log_tail"] = log[-3000:] if isinstance(log, str) else ""
        report["runs"][name] = entry
        print(json.dumps({name: {k: v for k, v in entry.items() if k != "log_tail"}}, default=str), flush=True)
        if rc != 0:
            print(entry["log_tail"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    ok = all(r["returncode"] == 0 and r.get("adapter", {}).get("empty_tensors") == 0 for r in report["runs"].values())
    print(f"wrote {args.out}; {'all runs OK' if ok else 'SOME RUNS FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
