"""Merge memory and time: vlmtune's shard-wise merge beside PEFT's merge_and_unload + save_pretrained.

A Qwen2-VL-2B-sized model with random bf16 weights (config from ../shared/reference/qwen2_vl_2b, about
4.4 GB, saved in 1 GB shards) and a LoRA adapter (r16 on the language model's linear layers, random
non-zero A and B) are written once; then each arm runs in its own Python process, so its peak RSS
(getrusage ru_maxrss, which counts mapped file pages it touched) is its own:

- vlmtune: `vlmtune.merge_adapter(adapter, out, check=False, shard_size=...)`
- peft:    `AutoModelForImageTextToText.from_pretrained(base, dtype=bf16)`, `PeftModel.from_pretrained`,
           `merge_and_unload()`, `save_pretrained(out, max_shard_size=...)`
- vlmtune+check (with --with-check): the same merge plus its parity check (float32 models, one at a time)

Both outputs are compared weight by weight afterwards; the big files are deleted unless --keep.

    python bench/merge_memory.py --out bench/results/merge-cpu.json
    python bench/merge_memory.py --arch tiny --shard-size 300KB --out /tmp/merge-smoke.json   # seconds

Internal entry points (used by the parent process): `_prepare SPEC.json`, `_arm SPEC.json`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REFERENCE = ROOT.parent / "shared" / "reference"
TARGETS = r"^model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"


def _peak_rss() -> int:
    """This process's peak resident set in bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _rss_now() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.lower().startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        mem = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "memory_bytes": mem, "platform": platform.platform(),
            "python": platform.python_version()}


def _versions() -> dict:
    import importlib

    out = {}
    for name in ("torch", "transformers", "peft", "safetensors", "vlmtune"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as e:  # noqa: BLE001
            out[name] = f"unavailable ({e.__class__.__name__})"
    return out


# ---------------------------------------------------------------------------------------------- prepare
def prepare(spec: dict) -> dict:
    """Write the base model folder and the adapter folder; return facts about them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmtune.run_metadata import write_metadata

    work = Path(spec["work"])
    base, adapter = work / "base", work / "adapter"
    if spec["arch"] == "tiny":
        from vlmtune.demo import builtin_model_path

        config = AutoConfig.from_pretrained(builtin_model_path("tiny-qwen2-vl"))
    else:
        config = AutoConfig.from_pretrained(REFERENCE / "qwen2_vl_2b")
    torch.manual_seed(0)
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(base, max_shard_size=spec["shard_size"])
    processor = _processor(spec["arch"])
    params = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    peft_model.save_pretrained(adapter)
    processor.save_pretrained(adapter)
    write_metadata(adapter, {"family": "qwen2_vl", "base_model": str(base), "quantization": "none",
                             "train_on": "assistant"})
    shards = sorted(base.glob("*.safetensors"))
    return {"parameters": params, "lora_parameters": lora_params, "base_shards": len(shards),
            "base_bytes": sum(p.stat().st_size for p in shards),
            "largest_shard_bytes": max(p.stat().st_size for p in shards),
            "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
            "prepare_seconds": time.perf_counter() - start}


def _processor(arch: str):
    """A complete Qwen2-VL processor (the real Qwen2 vocabulary for the 2B model) for the adapter folder."""
    if arch == "tiny":
        from transformers import AutoProcessor

        from vlmtune.demo import builtin_model_path

        return AutoProcessor.from_pretrained(builtin_model_path("tiny-qwen2-vl"))
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    ref = REFERENCE / "qwen2_5_vl_7b_instruct"  # same vocabulary as Qwen2-VL-2B; the Instruct chat template
    template = json.loads((ref / "chat_template.json").read_text())["chat_template"]
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=AutoTokenizer.from_pretrained(ref),
                            video_processor=Qwen2VLVideoProcessor(), chat_template=template)


# ---------------------------------------------------------------------------------------------- arms
def run_arm(spec: dict) -> dict:
    """One merge in this process; returns wall time and peak RSS."""
    import torch  # noqa: F401  (imports are part of the baseline, not of the merge)
    import transformers  # noqa: F401

    import vlmtune

    work, arm = Path(spec["work"]), spec["arm"]
    out = work / f"out-{arm}"
    baseline = _rss_now()
    start = time.perf_counter()
    if arm.startswith("vlmtune"):
        result = vlmtune.merge_adapter(work / "adapter", out, check=arm == "vlmtune+check",
                                       shard_size=spec["shard_size"], log=lambda *_: None, progress=False)
        extra = {"check": result.check}
    else:
        from peft import PeftModel
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(work / "base", dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, work / "adapter").merge_and_unload()
        model.save_pretrained(out, max_shard_size=spec["shard_size"])
        extra = {}
    return {"wall_seconds": time.perf_counter() - start, "peak_rss_bytes": _peak_rss(),
            "rss_after_imports_bytes": baseline, **extra}


def compare(a: Path, b: Path) -> dict:
    """Largest difference between the two merged folders' weights (same names), read one tensor at a time."""
    from safetensors import safe_open

    def files(folder):
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"] \
            if (folder / "model.safetensors.index.json").is_file() else None
        return index or {k: "model.safetensors" for k in safe_open(str(folder / "model.safetensors"), "pt").keys()}

    fa, fb = files(a), files(b)
    if set(fa) != set(fb):
        return {"same_names": False, "only_vlmtune": sorted(set(fa) - set(fb))[:5],
                "only_peft": sorted(set(fb) - set(fa))[:5]}
    worst, worst_rel = 0.0, 0.0
    for name in sorted(fa):
        with safe_open(str(a / fa[name]), "pt") as x, safe_open(str(b / fb[name]), "pt") as y:
            ta, tb = x.get_tensor(name).float(), y.get_tensor(name).float()
        diff = (ta - tb).abs().max().item() if ta.numel() else 0.0
        worst = max(worst, diff)
        worst_rel = max(worst_rel, diff / max(tb.abs().max().item(), 1e-30))
    return {"same_names": True, "tensors": len(fa), "max_abs_diff": worst, "max_rel_diff": worst_rel}


# ---------------------------------------------------------------------------------------------- driver
def _child(entry: str, spec: dict, work: Path, timeout: int) -> dict:
    path = work / f"{entry}-{spec.get('arm', 'prepare')}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, entry, str(path)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["qwen2-vl-2b", "tiny"], default="qwen2-vl-2b")
    parser.add_argument("--shard-size", default="1GB", help="shard size of the base and of both outputs")
    parser.add_argument("--with-check", action="store_true", help="also time vlmtune's merge with its parity check")
    parser.add_argument("--work-dir", help="where the big files go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the model folders")
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--out", required=True, help="JSON results file")
    args = parser.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="vlmtune-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    spec = {"work": str(work), "arch": args.arch, "shard_size": args.shard_size}
    try:
        facts = _child("_prepare", spec, work, args.timeout)
        if "error" in facts:
            print(facts["error"], file=sys.stderr)
            return 1
        arms = ["vlmtune", "peft"] + (["vlmtune+check"] if args.with_check else [])
        results = {}
        for arm in arms:
            results[arm] = _child("_arm", {**spec, "arm": arm}, work, args.timeout)
            print(f"{arm:14} " + (f"{results[arm]['wall_seconds']:7.1f} s  peak RSS "
                                  f"{results[arm]['peak_rss_bytes'] / 2**30:6.2f} GiB"
                                  if "error" not in results[arm] else "FAILED: " + results[arm]["error"][-300:]))
        agreement = (compare(work / "out-vlmtune", work / "out-peft")
                     if all("error" not in results[a] for a in ("vlmtune", "peft")) else None)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "arch": args.arch,
              "shard_size": args.shard_size, "model": facts, "lora": {"r": 16, "alpha": 32, "targets": TARGETS},
              "arms": results, "agreement": agreement, "machine": _machine(), "versions": _versions(),
              "rss_note": "ru_maxrss of each arm's own process: includes the Python/torch import baseline "
                          "(rss_after_imports_bytes) and the base shard pages mapped by safe_open"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("_prepare", "_arm"):
        spec = json.loads(Path(sys.argv[2]).read_text())
        print(json.dumps(prepare(spec) if sys.argv[1] == "_prepare" else run_arm(spec)))
    else:
        sys.exit(main())
