"""The parent process: options, the `_prepare` child, one child per arm, then the JSON report."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import report as rep
from .arms import ARMS, FAST_FIELDS, LORA, TRL_TARGET_REGEX
from .common import (
    DEFAULT_REFERENCE,
    DEFAULT_TOKENIZER_REFERENCE,
    HERE,
    ROOT,
    cpu_name,
    load_average,
    now,
    read_json,
    write_json,
)
from .model import ARCHS

ENTRY = HERE / "train_throughput.py"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Training throughput: TRL's VLM recipe beside vlmtune and vlmtune-fast",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", choices=("sft", "dpo"), default="sft",
                   help="dpo: TRL's documented VLM DPO recipe beside vlmtune's DPO (bench/dpo_throughput.py; tiny "
                        "model; --num-samples pairs, --epochs, --batch-size, --learning-rate, "
                        "--gradient-checkpointing, --out)")
    p.add_argument("--arch", choices=ARCHS, default="tiny")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--quant", choices=("none", "4bit"), default="none")
    p.add_argument("--batch-size", type=int, default=8, help="samples per step (unpacked arms)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=64, help="rounded up to a multiple of --batch-size")
    p.add_argument("--image-size", type=int, default=448, help="largest image side (sides vary down to 1/4 of it)")
    p.add_argument("--gradient-checkpointing", choices=("default", "on", "off"), default="default",
                   help="default: each arm's own (TRL: on; vlmtune: its default; vlmtune-fast: auto, else off)")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=None, help="vlmtune data.num_workers (default: vlmtune's)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads in the arm processes (default: torch's; 1 is steadier on a busy CPU)")
    p.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE, help="folder with the 2B config.json")
    p.add_argument("--tokenizer-reference", type=Path, default=DEFAULT_TOKENIZER_REFERENCE,
                   help="folder with vocab.json/merges.txt/chat_template.json (Qwen2.5-VL-Instruct)")
    p.add_argument("--work-dir", type=Path, default=HERE / ".work",
                   help="model, data and run folders (model and data are reused when they match)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<arch>-<quant>.json)")
    p.add_argument("--name", default=None, help="free-form label stored in the JSON")
    p.add_argument("--arm-timeout", type=float, default=None, help="seconds per arm process")
    p.add_argument("--profile-step", type=int, default=None,
                   help="profile this training step (1-based) in every arm: forward seconds of the vision tower, "
                        "decoder and LM head, and torch.profiler's top operators (raw.<arm>.probe.profile; the "
                        "profiler's overhead falls into that arm's timing)")
    args = p.parse_args(argv)
    args.learning_rate_given = any(a == "--learning-rate" or a.startswith("--learning-rate=")
                                   for a in (sys.argv[1:] if argv is None else argv))
    if args.method == "dpo" and args.arch != "tiny":
        p.error("--method dpo runs on the tiny model only (bench/dpo_throughput.py)")
    args.arm_list = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arm_list if a not in ARMS]
    if bad or not args.arm_list:
        p.error(f"--arms must name some of {', '.join(ARMS)}; got {args.arms!r}")
    for name in ("batch_size", "epochs", "num_samples", "image_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def run_child(argv: list[str], log: Path, timeout: float | None, env_extra: dict | None = None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", **(env_extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        # Own session, so a timeout also ends the arm's DataLoader workers (its process group, by id).
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write(f"\n[bench] killed after {timeout:.0f}s (--arm-timeout)\n")
            rc = 124
    wall = time.perf_counter() - t0
    tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:])
    return rc, wall, tail


def packing_plan(samples: list[dict], batch_size: int) -> tuple[int, int]:
    """vlmtune-fast's bin capacity (the longest sample, rounded up to 64 tokens, so none is dropped) and packed
    rows per step (about the tokens of `batch_size` samples)."""
    longest = max(s["tokens"] for s in samples)
    mean = sum(s["tokens"] for s in samples) / len(samples)
    capacity = -(-(longest + 16) // 64) * 64
    return capacity, max(1, round(batch_size * mean / capacity))


def dpo_argv(args: argparse.Namespace) -> list[str]:
    """bench/dpo_throughput.py's arguments for a `--method dpo` run."""
    argv = ["--pairs", str(args.num_samples), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--gradient-checkpointing", args.gradient_checkpointing]
    if args.learning_rate_given:
        argv += ["--learning-rate", str(args.learning_rate)]
    if args.out is not None:
        argv += ["--out", str(args.out)]
    return argv


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.method == "dpo":
        sys.path.insert(0, str(HERE))
        import dpo_throughput

        return dpo_throughput.main(dpo_argv(args))
    started = time.perf_counter()
    n = -(-args.num_samples // args.batch_size) * args.batch_size  # no ragged last batch
    work = args.work_dir.resolve()
    model_dir = work / f"model-{args.arch}"
    data_dir = work / f"data-{args.arch}-n{n}-px{args.image_size}-seed{args.seed}"
    out = args.out or (HERE / "results" / f"{args.arch}-{args.quant}.json")
    prep = {"arch": args.arch, "seed": args.seed, "reference": str(args.reference.resolve()),
            "tokenizer_reference": str(args.tokenizer_reference.resolve()), "model_dir": str(model_dir),
            "data_dir": str(data_dir), "num_samples": n, "image_size": args.image_size, "data_seed": args.seed}
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "prepare-spec.json", prep)
    print(f"preparing model ({args.arch}) and {n} samples in {work} ...", flush=True)
    rc, _, tail = run_child([sys.executable, str(ENTRY), "_prepare", str(work / "prepare-spec.json")],
                            work / "prepare.log", None)
    if rc != 0:
        print(tail, file=sys.stderr)
        print(f"error: preparing model/data failed (rc {rc}); log: {work / 'prepare.log'}", file=sys.stderr)
        return 1
    data_info = read_json(data_dir / "bench-data.json")["info"]
    samples = read_json(data_dir / "bench-samples.json")
    pixels = data_info["pixels"]
    model_info = read_json(model_dir / "bench-model.json")["info"]
    capacity, packed_batch = packing_plan(samples, args.batch_size)

    tag = f"{args.arch}-{args.quant}-gc{args.gradient_checkpointing}-b{args.batch_size}"
    raws: dict[str, dict] = {}
    for arm in args.arm_list:
        arm_dir = work / "runs" / tag / arm
        shutil.rmtree(arm_dir / "cache", ignore_errors=True)  # each run builds its own caches
        spec = {"arm": arm, "model_dir": str(model_dir), "data_dir": str(data_dir), "run_dir": str(arm_dir / "output"),
                "cache_dir": str(arm_dir / "cache"), "batch_size": args.batch_size, "epochs": args.epochs,
                "learning_rate": args.learning_rate, "quant": args.quant,
                "gradient_checkpointing": args.gradient_checkpointing, "seed": args.seed, **pixels,
                "num_workers": args.num_workers, "torch_threads": args.torch_threads,
                "profile_step": args.profile_step, "pack_capacity": capacity, "packed_batch_size": packed_batch,
                "result": str(arm_dir / "result.json")}
        write_json(arm_dir / "spec.json", spec)
        Path(spec["result"]).unlink(missing_ok=True)
        log = arm_dir / "arm.log"
        print(f"[{arm}] running in its own process (log: {log}) ...", flush=True)
        load_before = load_average()
        # OMP_NUM_THREADS too: vlmtune keeps a thread count the user set that way instead of choosing its own
        threads = {"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else None
        rc, wall, tail = run_child([sys.executable, str(ENTRY), "_arm", str(arm_dir / "spec.json")], log,
                                   args.arm_timeout, threads)
        if rc == 0:
            raw = read_json(Path(spec["result"]))
        else:
            print(tail, file=sys.stderr)
            print(f"[{arm}] failed (rc {rc}); log: {log}", file=sys.stderr)
            raw = {"error": f"rc {rc}: " + (tail.strip().splitlines() or [""])[-1], "log_tail": tail}
        raw.update(_process_wall_seconds=wall, _load_before=load_before, _load_after=load_average(), log=str(log))
        raws[arm] = raw
        if "error" not in raw:
            print(f"[{arm}] done in {wall:.1f}s ({raw['probe']['train_seconds']:.1f}s training)", flush=True)

    ok = {a: r for a, r in raws.items() if "error" not in r}
    device = next((r["device"] for r in ok.values() if r.get("device")), None) or cpu_name()
    model_config = read_json(model_dir / "config.json")
    reference = read_json(args.reference / "config.json") if (args.reference / "config.json").is_file() else None
    arms = {}
    for arm, raw in raws.items():
        if "error" in raw:
            arms[arm] = {"error": raw["error"], "log": raw["log"], "wall_seconds": raw["_process_wall_seconds"]}
        else:
            arms[arm] = rep.figures(raw, args.epochs, model_config, samples, device)
    ratios = rep.ratios(arms)
    report = {
        "name": args.name or out.stem, "date": now(), "device": device,
        "machine": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_average_at_end": load_average()},
        "versions": next((r["versions"] for r in ok.values() if r.get("versions")), None),
        "python": platform.python_version(),
        "settings": {
            "arch": args.arch, "quant": args.quant, "arms": args.arm_list, "batch_size": args.batch_size,
            "epochs": args.epochs, "num_samples": n, "image_size": args.image_size,
            "gradient_checkpointing": args.gradient_checkpointing, "learning_rate": args.learning_rate,
            "seed": args.seed, "torch_threads": args.torch_threads, "profile_step": args.profile_step,
            "vlmtune_num_workers": args.num_workers,
            "lora": {**LORA, "trl_target_modules": TRL_TARGET_REGEX,
                     "vlmtune_target_modules": "vlmtune default (language model linear layers)"},
            "vlmtune_fast": {"wanted_fields": FAST_FIELDS, "pack_capacity_tokens": capacity,
                             "packed_rows_per_step": packed_batch,
                             "set_fields": (raws.get("vlmtune-fast") or {}).get("recipe_fields"),
                             "skipped_fields": (raws.get("vlmtune-fast") or {}).get("skipped_fields")},
            "precision": "bf16 weights + bf16 autocast on GPU; fp32 on CPU",
            "quantization": ("nf4, double quant, bf16 compute, skip model.visual and lm_head"
                             if args.quant == "4bit" else None),
            "pixels": pixels, "model": model_info, "data": data_info,
        },
        "flop_shares": rep.flop_shares(model_config, reference, samples),
        "timing": {
            "samples_per_second": "epochs x samples / (the arm's epochs, timed by a TrainerCallback on_epoch_begin "
                                  "/ on_epoch_end with the GPU synchronised, + the vision-cache pre-pass if any)",
            "epoch_2_over_1_speedup": "(pre-pass + first epoch) / second epoch",
            "tokens": "counted per batch in trainer.compute_loss (main process): positions, non-pad tokens "
                      "(attention_mask, or ids != pad for packed rows), labels != -100 after the shift",
            "vision_tower_calls": "a forward hook on model.visual (pre-pass and per epoch)",
            "peak_memory": "GPU: torch.cuda.max_memory_allocated() over training, reset just before it; CPU: "
                           "ru_maxrss of the arm process (children: DataLoader workers)",
            "mfu": "(4 x LLM parameters x non-pad tokens + vision forward FLOPs) / seconds / device bf16 peak",
        },
        "arms": arms,
        "ratios": ratios,
        "goals": rep.goals(arms, ratios, not device.startswith("cpu")),
        "raw": {a: {k: v for k, v in r.items() if k != "log_tail"} for a, r in raws.items()},
        "total_seconds": time.perf_counter() - started,
    }
    write_json(out, report)
    print()
    print(rep.markdown_table(report))
    print(f"\nwrote {out}")
    return 0 if len(ok) == len(raws) else 1
