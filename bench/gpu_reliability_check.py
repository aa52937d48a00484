"""GPU check of the run guards of issue 8, which were tested on the CPU only: bad samples skipped mid-run with
DataLoader workers, the non-finite guard under bf16 and fp16 mixed precision (grad-scaler overflows are not
non-finite steps; a NaN loss stops the run unsaved), and atomic checkpoints with a resume, all on tiny models.

    python bench/gpu_reliability_check.py [--out bench/results/gpu-reliability.json]
    python bench/gpu_reliability_check.py --cpu --out /tmp/x.json   # the script itself, on a CPU (fp16 skipped)

One JSON file: per check its status (pass / fail / skipped), the measured values, what failed and the wall time,
with the device and library versions. It is rewritten after each check, so a killed run keeps what it finished.
The exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine reaches nothing
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import train_throughput as tt  # noqa: E402  (date, device name, versions, atomic JSON write)

QWEN, LLAVA = "builtin:tiny-qwen2-vl", "builtin:tiny-llava"  # fp16 is refused for Qwen families
OVERFLOW_INIT_SCALE = 2.0**40  # the grad scaler's first scale: its first steps overflow in fp16 for certain
NONFINITE_LIMIT = 3  # train.max_nonfinite_steps (vlmtune's default)


class CheckTimeout(Exception):
    pass


# ----------------------------------------------------------------------------------------------- data, recipes
def make_data(folder: Path, n: int = 8) -> tuple[Path, list[Path]]:
    """n one-image rows (file rows 1..n), each its own noise PNG (large enough that half a file keeps its header)."""
    import json

    import numpy as np
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, paths = [], []
    for k in range(n):
        path = folder / "images" / f"img{k}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": f"It is colour number {k}."}]})
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return data, paths


def recipe(ctx, model: str, dtype: str, data: Path, out: Path, **extra):
    import vlmtune

    fields = {"model.name_or_path": model, "model.dtype": dtype, "data.train": str(data), "output_dir": str(out),
              "train.use_cpu": ctx.cpu, "train.per_device_train_batch_size": 2,
              "train.gradient_accumulation_steps": 1, "train.learning_rate": 1e-3, "train.logging_steps": 1,
              "train.save_steps": 1000, "train.save_total_limit": 10, "train.max_nonfinite_steps": NONFINITE_LIMIT,
              "data.num_workers": 1, "lora.dropout": 0.0}
    fields.update(extra)
    return vlmtune.load_recipe(None, overrides=fields)


def adapter_figures(path: Path) -> dict:
    """Whether every tensor of a saved adapter is finite, and whether training moved it (LoRA B starts at 0)."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(path)
    return {"tensors": len(weights), "finite": all(bool(torch.isfinite(t).all()) for t in weights.values()),
            "lora_b_nonzero": any(bool(t.abs().sum() > 0) for n, t in weights.items() if "lora_B" in n)}


def checkpoint_listing(checkpoints: Path) -> dict:
    from vlmtune.checkpoints import STAGING, is_complete

    names = sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) if checkpoints.is_dir() else []
    return {"entries": names, "staging_left": STAGING in names,
            "incomplete": [n for n in names if n != STAGING and not is_complete(checkpoints / n)]}


@contextlib.contextmanager
def patched(owner, name: str, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


@contextlib.contextmanager
def on_trainer(setup):
    """Calls setup(trainer) on the trainer vlmtune.train builds, before it trains."""
    from vlmtune import training

    real = training.build_trainer

    def build(*args, **kwargs):
        trainer, report = real(*args, **kwargs)
        setup(trainer)
        return trainer, report

    with patched(training, "build_trainer", build):
        yield


def step_observer(trainer, seen: list, on_save=None):
    """A callback (after vlmtune's guards) recording, per optimizer step, what the scaler and the guard saw."""
    from transformers import TrainerCallback

    class Observe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            scaler = trainer.accelerator.scaler
            seen.append({"step": state.global_step, "scaler_skipped": trainer.accelerator.optimizer_step_was_skipped,
                         "scale": scaler.get_scale() if scaler is not None else None,
                         "guard_run": trainer.nonfinite.run})

        def on_save(self, args, state, control, **kwargs):
            if on_save is not None:
                on_save(state)

    trainer.add_callback(Observe())


# ----------------------------------------------------------------------------------------------- the checks
def check_bad_samples(ctx) -> tuple[dict, list[str]]:
    """Two images truncated after the data were written (headers intact, so data.check_images=header passes them):
    their rows fail in the DataLoader workers, are skipped and counted once over two epochs."""
    import json

    import vlmtune

    data, paths = make_data(ctx.dir / "data")
    bad_rows = (2, 6)
    for row in bad_rows:
        content = paths[row - 1].read_bytes()
        paths[row - 1].write_bytes(content[: len(content) // 2])
    steps, workers = 8, 2
    r = recipe(ctx, QWEN, ctx.dtype, data, ctx.dir / "out", **{
        "data.check_images": "header", "data.num_workers": workers, "train.per_device_train_batch_size": 1,
        "train.gradient_accumulation_steps": 2, "train.max_steps": steps, "train.learning_rate": 1e-2})
    result = vlmtune.train(r, log=ctx.log)  # 8 steps x 2 micro-batches of 1 row = two epochs of 8 rows
    saved = json.loads((result.output_dir / "train_results.json").read_text())
    wanted = sorted(f"{data}:{k}" for k in bad_rows)
    named = [line for line in ctx.lines if line.startswith("skipped bad sample")]
    m = {"dtype": ctx.dtype, "num_workers": workers, "global_step": saved["global_step"], "epochs": saved.get("epoch"),
         "bad_rows_expected": wanted, "bad_sample_count": saved["bad_sample_count"],
         "bad_samples": saved["bad_samples"], "skip_lines_logged": len(named),
         "adapter": adapter_figures(result.output_dir / "adapter_model.safetensors")}
    failures = []
    if saved["global_step"] != steps:
        failures.append(f"global_step {saved['global_step']}, not {steps}")
    if (saved.get("epoch") or 0) < 2:
        failures.append(f"trained {saved.get('epoch')} epochs: the once-per-run count is not exercised")
    if saved["bad_sample_count"] != len(bad_rows):
        failures.append(f"bad_sample_count {saved['bad_sample_count']}, not {len(bad_rows)} "
                        "(once per row, not per epoch)")
    if sorted(b["source"] for b in saved["bad_samples"]) != wanted:
        failures.append(f"bad sample sources {[b['source'] for b in saved['bad_samples']]}, not {wanted}")
    if not all("cannot be decoded" in b["reason"] for b in saved["bad_samples"]):
        failures.append("a bad sample's reason does not say the image cannot be decoded")
    if len(named) != len(bad_rows):
        failures.append(f"{len(named)} 'skipped bad sample' log lines, not {len(bad_rows)}")
    if not m["adapter"]["finite"]:
        failures.append("the adapter holds NaN/inf")
    return m, failures


def check_fp16_overflow(ctx) -> tuple[dict, list[str]]:
    """fp16 with the grad scaler started so high that its first steps overflow: those skipped steps are the scaler
    working, not non-finite steps; the run must finish and train once the scale has come down."""
    import vlmtune

    data, _ = make_data(ctx.dir / "data")
    steps, seen, scalers = 40, [], []

    def setup(trainer):
        scaler = trainer.accelerator.scaler
        scalers.append(scaler is not None)
        if scaler is not None:
            scaler._init_scale = OVERFLOW_INIT_SCALE  # read when the scale is first made (torch GradScaler)
        step_observer(trainer, seen)

    with on_trainer(setup):
        result = vlmtune.train(recipe(ctx, LLAVA, "float16", data, ctx.dir / "out", **{"train.max_steps": steps}),
                               log=ctx.log)
    skipped = [s["step"] for s in seen if s["scaler_skipped"]]
    leading = next((i for i, s in enumerate(seen) if not s["scaler_skipped"]), len(seen))
    m = {"dtype": "float16", "grad_scaler": bool(scalers and scalers[0]), "init_scale": OVERFLOW_INIT_SCALE,
         "global_step": result.metrics["global_step"], "scaler_skipped_steps": len(skipped),
         "leading_skipped_steps": leading, "max_nonfinite_steps": NONFINITE_LIMIT,
         "largest_guard_count": max((s["guard_run"] for s in seen), default=None),
         "final_scale": seen[-1]["scale"] if seen else None,
         "adapter": adapter_figures(result.output_dir / "adapter_model.safetensors")}
    failures = []
    if not m["grad_scaler"]:
        failures.append("no grad scaler: fp16 mixed precision was not active")
    if m["global_step"] != steps:
        failures.append(f"global_step {m['global_step']}, not {steps}")
    if leading <= NONFINITE_LIMIT:
        failures.append(f"inconclusive: only the first {leading} steps overflowed, not more than "
                        f"train.max_nonfinite_steps={NONFINITE_LIMIT} (raise OVERFLOW_INIT_SCALE)")
    if m["largest_guard_count"]:
        failures.append(f"the guard counted {m['largest_guard_count']} scaler-skipped steps as non-finite")
    if leading == len(seen):
        failures.append("every step overflowed: the scaler never recovered (raise max_steps)")
    if not (m["adapter"]["finite"] and m["adapter"]["lora_b_nonzero"]):
        failures.append(f"adapter finite {m['adapter']['finite']}, trained {m['adapter']['lora_b_nonzero']}")
    return m, failures


def check_nan_loss(ctx, model: str, dtype: str) -> tuple[dict, list[str]]:
    """From step 2 on the loss is NaN (as tests/test_nonfinite.py patches it): 3 such steps stop the run with
    vlmtune's message, no adapter is written, and the checkpoints before it are finite and untouched by NaN steps."""
    import torch
    from safetensors.torch import load_file

    import vlmtune
    from vlmtune.label_loss import LabelOnlyLoss  # the loss layer just below the guards, on either loss path

    data, _ = make_data(ctx.dir / "data")
    real = LabelOnlyLoss.compute_loss

    def nan_after_the_first_step(self, model, inputs, *args, **kwargs):
        loss = real(self, model, inputs, *args, **kwargs)
        return loss * math.nan if self.state.global_step >= 1 and model.training else loss

    out = ctx.dir / "out"
    message = None
    with patched(LabelOnlyLoss, "compute_loss", nan_after_the_first_step):
        try:
            vlmtune.train(recipe(ctx, model, dtype, data, out, **{"train.max_steps": 10, "train.save_steps": 1}),
                          log=ctx.log)
        except vlmtune.VlmtuneError as e:
            message = str(e)
    saved = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    weights = [load_file(p / "adapter_model.safetensors") for p in saved]
    m = {"model": model, "dtype": dtype, "message": message, "adapter_written": (out / "adapter_model.safetensors")
         .exists(), "checkpoints": [p.name for p in saved],
         "checkpoints_finite": all(bool(torch.isfinite(t).all()) for w in weights for t in w.values()),
         "nan_steps_left_weights_unchanged": bool(weights) and all(torch.equal(weights[0][k], weights[-1][k])
                                                                   for k in weights[0])}
    failures = []
    wanted = [f"{NONFINITE_LIMIT} consecutive steps (train.max_nonfinite_steps={NONFINITE_LIMIT})",
              "the last at step 4", "loss nan", "nothing non-finite was saved"]
    if dtype == "float16":
        wanted.append("use model.dtype: bfloat16 instead of float16")
    if message is None:
        failures.append("the run did not stop")
    else:
        failures += [f"message lacks {w!r}" for w in wanted if w not in message]
    if m["adapter_written"]:
        failures.append("an adapter was written")
    if m["checkpoints"] != ["checkpoint-1", "checkpoint-2", "checkpoint-3"]:
        failures.append(f"checkpoints {m['checkpoints']}, not checkpoint-1..3 (none at the stopping step)")
    if not m["checkpoints_finite"]:
        failures.append("a checkpoint holds NaN/inf")
    if not m["nan_steps_left_weights_unchanged"]:
        failures.append("the NaN steps changed the weights (checkpoint-1 and the last differ)")
    return m, failures


def check_checkpoints(ctx, model: str, dtype: str) -> tuple[dict, list[str]]:
    """save_steps=1, interrupted (KeyboardInterrupt) after checkpoint-2: only complete checkpoint-N folders and
    no .saving leftovers, after every save and after the kill; train.resume_from_checkpoint=latest continues."""
    import vlmtune

    data, _ = make_data(ctx.dir / "data")
    out = ctx.dir / "out"
    ckpts = out / "checkpoints"
    fields = {"train.max_steps": 4, "train.save_steps": 1}
    after_saves, seen = [], []

    def stop_after_two(state):
        after_saves.append({"step": state.global_step, **checkpoint_listing(ckpts)})
        if state.global_step == 2:
            raise KeyboardInterrupt

    interrupted = False
    with on_trainer(lambda trainer: step_observer(trainer, [], on_save=stop_after_two)):
        try:
            vlmtune.train(recipe(ctx, model, dtype, data, out, **fields), log=ctx.log)
        except KeyboardInterrupt:
            interrupted = True
    after_kill = checkpoint_listing(ckpts)
    kept = sorted(p.name for p in (ckpts / "checkpoint-2").iterdir()) if (ckpts / "checkpoint-2").is_dir() else []
    with on_trainer(lambda trainer: step_observer(trainer, seen)):
        result = vlmtune.train(recipe(ctx, model, dtype, data, out, **fields,
                                      **{"train.resume_from_checkpoint": "latest"}), log=ctx.log)
    final = checkpoint_listing(ckpts)
    resumed_line = f"resuming from {ckpts / 'checkpoint-2'}"
    m = {"model": model, "dtype": dtype, "interrupted_after_checkpoint_2": interrupted,
         "after_each_save": after_saves, "after_interrupt": after_kill, "checkpoint_2_files": kept,
         "resumed_from_checkpoint_2": resumed_line in ctx.lines,
         "steps_trained_on_resume": [s["step"] for s in seen], "global_step": result.metrics["global_step"],
         "after_resume": final, "finished": (out / "vlmtune.json").is_file(),
         "adapter": adapter_figures(result.output_dir / "adapter_model.safetensors")}
    failures = []
    if not interrupted:
        failures.append("the interrupt after checkpoint-2 did not stop the first run")
    for where, listing in [*((f"after the save of step {s['step']}", s) for s in after_saves),
                           ("after the interrupt", after_kill), ("after the resume", final)]:
        if listing["staging_left"] or listing["incomplete"]:
            failures.append(f"{where}: .saving left {listing['staging_left']}, incomplete {listing['incomplete']}")
    if after_kill["entries"] != ["checkpoint-1", "checkpoint-2"]:
        failures.append(f"after the interrupt: {after_kill['entries']}, not checkpoint-1, checkpoint-2")
    if dtype == "float16" and "scaler.pt" not in kept:
        failures.append("checkpoint-2 has no scaler.pt (the fp16 grad scaler's state)")
    if not m["resumed_from_checkpoint_2"]:
        failures.append(f"no log line {resumed_line!r}")
    if m["steps_trained_on_resume"] != [3, 4] or m["global_step"] != 4:
        failures.append(f"the resume trained steps {m['steps_trained_on_resume']} to {m['global_step']}, not 3, 4")
    if final["entries"] != [f"checkpoint-{k}" for k in range(1, 5)]:
        failures.append(f"after the resume: {final['entries']}, not checkpoint-1..4")
    if not (m["finished"] and m["adapter"]["finite"]):
        failures.append(f"finished {m['finished']}, adapter finite {m['adapter']['finite']}")
    return m, failures


# ----------------------------------------------------------------------------------------------- running them
class Context:
    def __init__(self, work: Path, cpu: bool, dtype: str):
        self.work, self.cpu, self.dtype = work, cpu, dtype
        self.dir = work
        self.lines: list[str] = []

    def log(self, *parts, **_) -> None:
        line = " ".join(str(p) for p in parts)
        self.lines.append(line)
        print(line, flush=True)


def checks(ctx) -> list[tuple[str, object, str | None]]:
    """(name, function, why it is skipped or None)."""
    no_fp16 = "fp16 mixed precision needs a CUDA GPU (--cpu)" if ctx.cpu else None
    return [
        ("bad_samples_mid_run", check_bad_samples, None),
        ("fp16_scaler_overflow_not_counted", check_fp16_overflow, no_fp16),
        ("nan_loss_stops_unsaved", lambda c: check_nan_loss(c, QWEN, c.dtype), None),
        ("nan_loss_stops_unsaved_fp16", lambda c: check_nan_loss(c, LLAVA, "float16"), no_fp16),
        ("atomic_checkpoints_and_resume", lambda c: check_checkpoints(c, QWEN, c.dtype), None),
        ("atomic_checkpoints_and_resume_fp16", lambda c: check_checkpoints(c, LLAVA, "float16"), no_fp16),
    ]


def run_one(ctx, name: str, fn, timeout: int) -> dict:
    ctx.dir = ctx.work / name
    shutil.rmtree(ctx.dir, ignore_errors=True)
    ctx.dir.mkdir(parents=True)
    ctx.lines = []

    def alarm(signum, frame):
        raise CheckTimeout(f"the check ran past {timeout} s")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(timeout)
    t0 = time.perf_counter()
    try:
        measured, failures = fn(ctx)
        entry = {"status": "fail" if failures else "pass", "measured": measured, "failures": failures}
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001  (any error is this check's failure; the rest run on)
        entry = {"status": "fail", "failures": [f"{e.__class__.__name__}: {e}"],
                 "traceback": traceback.format_exc()[-4000:]}
    finally:
        signal.alarm(0)
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    if entry["status"] == "fail":
        entry["log_tail"] = ctx.lines[-30:]
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (fp32; the fp16 checks are skipped)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu-reliability.json")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/vlmtune-reliability-check"))
    ap.add_argument("--only", action="append", default=[], help="run only this check (repeatable)")
    ap.add_argument("--check-timeout", type=int, default=180, help="seconds one check may take")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (steadier on a busy CPU)")
    args = ap.parse_args(argv)
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cuda = torch.cuda.is_available()
    if not args.cpu and not cuda:
        print("no CUDA device: run on a GPU, or pass --cpu to check the script itself", file=sys.stderr)
        return 2
    ctx = Context(args.work_dir, args.cpu, "float32" if args.cpu else "bfloat16")
    all_checks = checks(ctx)
    unknown = set(args.only) - {n for n, _, _ in all_checks}
    if unknown:
        ap.error(f"unknown check(s) {sorted(unknown)}; known: {[n for n, _, _ in all_checks]}")
    t_start = time.perf_counter()
    report = {"name": "reliability guards of issue 8 on a GPU", "date": tt._now(),
              "device": tt._cpu_name() if args.cpu else tt._device_name(),
              "cuda_device": torch.cuda.get_device_name() if cuda else None, "versions": tt._versions(),
              "settings": {"cpu": args.cpu, "dtype": ctx.dtype, "models": [QWEN, LLAVA]}, "checks": {}}
    for name, fn, skip in all_checks:
        if args.only and name not in args.only:
            continue
        print(f"=== {name}", flush=True)
        entry = {"status": "skipped", "reason": skip} if skip else run_one(ctx, name, fn, args.check_timeout)
        report["checks"][name] = entry
        print(f"=== {name}: {entry['status']} {entry.get('failures') or ''}", flush=True)
        report["all_passed"] = all(c["status"] != "fail" for c in report["checks"].values())
        report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        tt._write_json(args.out, report)
    for name, entry in report["checks"].items():
        print(f"{name:40s} {entry['status']:8s} {entry.get('seconds', '')}")
    print(f"wrote {args.out} ({report['wall_seconds']} s)")
    return 0 if report["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
