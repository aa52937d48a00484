"""The tiny demo's training alone and beside a competing CPU load, with vlmtune's thread and worker choice and with
the old behaviour (torch's default threads: every CPU; min(4, CPUs - 1) DataLoader workers), reporting how much the
load slows each down. A benchmark, not a test: timings on a shared machine are rough, so the machine's load before
each arm is recorded beside its time.

    .venv/bin/python bench/cpu_contention.py                  # 16 steps of the demo, one busy process per CPU
    .venv/bin/python bench/cpu_contention.py --steps 320 --busy 4 --repeats 1   # the whole demo (10 epochs)

Arms run interleaved (old, vlmtune, old, ...) `--repeats` times per phase; each phase reports the median."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny-demo.yaml"

_ARM = """
import json, sys, time
import vlmtune
overrides = json.loads(sys.argv[1])
recipe = vlmtune.load_recipe(sys.argv[2], overrides=overrides)
start = time.perf_counter()
result = vlmtune.train(recipe, log=lambda *a, **k: None)
print(json.dumps({"wall_seconds": time.perf_counter() - start, "train_runtime": result.metrics.get("train_runtime"),
                  "global_step": result.metrics.get("global_step"), "fast_path": result.metrics.get("fast_path")}))
"""


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_arm(kind: str, steps: int, out: Path) -> dict:
    """One training run in a fresh process: kind "vlmtune" (its own choice), "old" (the behaviour before it) or
    "old-threads" (the old thread count with vlmtune's workers)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    overrides = {"train.max_steps": steps, "output_dir": str(out), "train.save_steps": 100000, "data.eval": None}
    if kind in ("old", "old-threads"):  # torch's default pool: one thread per CPU
        env["OMP_NUM_THREADS"] = str(cpus())
        # old: the old worker count; old-threads: vlmtune's workers, to tell the threads' share from the workers'
        overrides["data.num_workers"] = max(0, min(4, cpus() - 1)) if kind == "old" else None
    load = os.getloadavg()[0]
    done = subprocess.run([sys.executable, "-c", _ARM, json.dumps(overrides), str(RECIPE)], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{kind} arm failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"load_average_before": round(load, 2), **result}


def busy_processes(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True:\n    pass"]) for _ in range(n)]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=16, help="training steps of batch 8 (the whole demo: 320)")
    p.add_argument("--busy", type=int, default=None, help="competing busy processes (default: one per CPU)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each arm per phase (the median is reported)")
    p.add_argument("--kinds", default="old,vlmtune", help="arms, of old, vlmtune, old-threads")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu-contention.json"))
    args = p.parse_args(argv)
    busy = cpus() if args.busy is None else args.busy
    kinds = args.kinds.split(",")
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for phase in ("alone", "loaded"):
            load = busy_processes(busy) if phase == "loaded" else []
            try:
                time.sleep(2 if load else 0)
                for r in range(args.repeats):
                    for kind in kinds:
                        run = run_arm(kind, args.steps, Path(tmp) / f"{kind}-{phase}-{r}")
                        runs.setdefault(f"{kind}_{phase}", []).append(run)
                        print(f"{kind} {phase} #{r}: {run['train_runtime']:.1f} s (load {run['load_average_before']})",
                              flush=True)
            finally:
                for proc in load:
                    proc.kill()
                    proc.wait()
    seconds = {arm: round(median([r["train_runtime"] for r in rs]), 2) for arm, rs in runs.items()}
    slowdown = {kind: round(seconds[f"{kind}_loaded"] / seconds[f"{kind}_alone"], 2) for kind in kinds}
    report = {
        "what": "tiny demo training (recipes/tiny-demo.yaml, no eval) alone and beside busy processes; "
                "median train_runtime in seconds",
        "machine": {"cpus_available": cpus(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "note": "shared with other work while measured (other sessions' tests): see each run's "
                            "load_average_before; 'alone' means without the bench's own busy processes"},
        "steps": args.steps, "busy_processes": busy, "repeats": args.repeats,
        "median_train_seconds": seconds, "slowdown_under_load": slowdown,
        "over_vlmtune": {f"{kind}_{phase}": round(seconds[f"{kind}_{phase}"] / seconds[f"vlmtune_{phase}"], 2)
                         for kind in kinds if kind != "vlmtune" and "vlmtune" in kinds for phase in ("alone", "loaded")},
        "runs": runs,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_out, out)
    print(json.dumps({k: report[k] for k in ("median_train_seconds", "slowdown_under_load", "over_vlmtune")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
