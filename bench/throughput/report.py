"""Per-arm figures from the arms' raw results, the ratios between arms, the goals, and the Markdown table."""

from __future__ import annotations

import math

from . import flops
from .common import GIB, bf16_peak

RATIO_KEYS = ("samples_per_second", "samples_per_cpu_second", "supervised_tokens_per_second", "non_pad_tokens_per_second",
              "padding_fraction", "peak_gpu_memory_bytes", "peak_rss_bytes", "train_seconds", "wall_seconds")
PAIRS = (("vlmtune-fast", "trl"), ("vlmtune", "trl"), ("vlmtune-fast", "vlmtune"))


def _div(a, b):
    return a / b if a is not None and b else None


def figures(raw: dict, epochs: int, model_config: dict | None, samples: list[dict] | None, device: str) -> dict:
    """The numbers the report compares, for one arm that ran."""
    probe = raw["probe"]
    pre = raw.get("prepass") or {"seconds": 0.0, "cpu_seconds": 0.0, "vision_calls": 0}
    n = raw.get("train_examples") or 0
    seen = n * epochs
    train_s = probe["train_seconds"]
    seconds = train_s + pre["seconds"]
    c = probe["counts"]
    eps = probe["epochs"]
    rss = raw.get("peak_rss_bytes") or {}
    out = {
        "train_examples": n,
        "samples_per_second": _div(seen, seconds),
        "samples_per_second_epochs_only": _div(seen, train_s),
        # main-process CPU time (DataLoader workers not included): steadier than the clock on a shared CPU
        "cpu_seconds": sum(e.get("cpu_seconds", 0.0) for e in eps) + pre.get("cpu_seconds", 0.0),
        "supervised_tokens_per_second": _div(c["supervised"], seconds),
        "non_pad_tokens_per_second": _div(c["non_pad"], seconds),
        "padding_fraction": 1 - c["non_pad"] / c["positions"] if c["positions"] else None,
        "supervised_fraction": _div(c["supervised"], c["non_pad"]),
        "tokens_per_sample": _div(c["non_pad"], seen),
        "supervised_tokens_per_sample": _div(c["supervised"], seen),
        "steps": eps[-1]["steps_at_end"] if eps else None,
        "epoch_seconds": [e["seconds"] for e in eps],
        "epoch_samples_per_second": [_div(n, e["seconds"]) for e in eps],
        "prepass_seconds": pre["seconds"],
        "epoch_2_over_1_speedup": _div(eps[0]["seconds"] + pre["seconds"], eps[1]["seconds"]) if len(eps) > 1 else None,
        "epoch_2_over_1_speedup_without_prepass": _div(eps[0]["seconds"], eps[1]["seconds"]) if len(eps) > 1 else None,
        "vision_tower_calls": c["vision_calls"] + pre["vision_calls"],
        "vision_tower_calls_prepass": pre["vision_calls"],
        "vision_tower_calls_per_epoch": [e["vision_calls"] for e in eps],
        "vision_tower_calls_metric": (raw.get("vlmtune_metrics") or {}).get("vision_tower_calls"),
        "peak_gpu_memory_bytes": raw.get("peak_gpu_memory_bytes"),
        "peak_gpu_memory_gib": _div(raw.get("peak_gpu_memory_bytes"), GIB),
        "peak_rss_bytes": rss.get("self"),
        "peak_rss_gib": _div(rss.get("self"), GIB),
        "peak_rss_children_bytes": rss.get("children"),
        "train_seconds": seconds,
        "build_trainer_seconds": raw.get("build_trainer_seconds"),
        "gradient_checkpointing": (raw.get("effective") or {}).get("gradient_checkpointing"),
        "gradient_checkpointing_reason": ((raw.get("vlmtune_metrics") or {}).get("fast_path") or {})
        .get("gradient_checkpointing", {}).get("reason"),
        "setup_seconds": raw.get("setup_seconds"),
        "wall_seconds": raw.get("_process_wall_seconds"),
        "train_loss": raw.get("train_loss"),
        "load_average_before": raw.get("_load_before"), "load_average_after": raw.get("_load_after"),
    }
    out["samples_per_cpu_second"] = _div(seen, out["cpu_seconds"])
    if model_config and samples:
        work = flops.mfu_flops(model_config, samples) * epochs
        out["model_flops_per_second"] = _div(work, seconds)
        peak = bf16_peak(device)
        out["mfu"] = _div(out["model_flops_per_second"], peak) if peak and not device.startswith("cpu") else None
    return out


def ratios(arms: dict) -> dict:
    out = {}
    for a, b in PAIRS:
        if a in arms and b in arms and "error" not in arms[a] and "error" not in arms[b]:
            out[f"{a}/{b}"] = {k: _div(arms[a].get(k), arms[b].get(k)) for k in RATIO_KEYS}
    return out


def goals(arms: dict, ratio: dict, on_gpu: bool) -> dict:
    """The issue's goals, met or not (None where an arm is missing)."""
    r = ratio.get("vlmtune-fast/trl")
    fast = arms.get("vlmtune-fast", {})
    memory = "peak_gpu_memory_bytes" if on_gpu else "peak_rss_bytes"
    target = 4.0 if on_gpu else 3.0
    examples = {a: f.get("train_examples") for a, f in arms.items() if "error" not in f}
    return {
        "same_examples_in_every_arm": {"value": examples, "met": len(set(examples.values())) == 1},
        "fast_over_trl_samples_per_second": {"target": target, "value": r and r["samples_per_second"],
                                             "met": bool(r and r["samples_per_second"] and
                                                         r["samples_per_second"] >= target) if r else None},
        "fast_peak_memory_not_above_trl": {"memory": memory, "value": r and r[memory],
                                           "met": bool(r and r[memory] is not None and r[memory] <= 1.0)
                                           if r else None},
        "fast_epoch_2_over_1": {"target": 1.3, "value": fast.get("epoch_2_over_1_speedup"),
                                "met": (fast["epoch_2_over_1_speedup"] >= 1.3)
                                if fast.get("epoch_2_over_1_speedup") else None},
    }


def flop_shares(model_config: dict, reference_config: dict | None, samples: list[dict]) -> dict:
    """The model's shares of a step's FLOPs beside Qwen2-VL-2B's, on the benchmark's token counts."""
    if reference_config is None:  # no reference config at hand (e.g. a clone without ../shared): own shares only
        return {name: {"small": flops.step_flops(model_config, samples, labels_only)["shares"], "reference": None,
                       "max_share_difference_points": None}
                for name, labels_only in (("plain_step", False), ("labels_only_step", True))}
    return flops.compare(model_config, reference_config, samples)


def _fmt(x, digits=2, suffix=""):
    if x is None:
        return "–"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return f"{x:,.{digits}f}{suffix}"


def markdown_table(report: dict) -> str:
    s = report["settings"]
    gpu = not str(report["device"]).startswith("cpu")
    mem = "peak GPU GiB" if gpu else "peak RSS GiB"
    lines = [f"device: {report['device']} | arch {s['arch']} | quant {s['quant']} | batch {s['batch_size']} | "
             f"{s['num_samples']} samples x {s['epochs']} epochs | images up to {s['image_size']} px",
             "",
             f"| arm | samples/s | samples/CPU-s | supervised tok/s | padding | vision calls (per epoch) | {mem} "
             "| epoch s | epoch 2/1 | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, f in report["arms"].items():
        if "error" in f:
            lines.append(f"| {arm} | failed: {f['error'][:60]} |" + " |" * 8)
            continue
        memory = f["peak_gpu_memory_gib"] if gpu else f["peak_rss_gib"]
        calls = "/".join(str(c) for c in f["vision_tower_calls_per_epoch"])
        if f["vision_tower_calls_prepass"]:
            calls = f"{f['vision_tower_calls_prepass']} pre-pass + {calls}"
        epochs = " / ".join(_fmt(e, 1) for e in f["epoch_seconds"])
        if f["prepass_seconds"]:
            epochs = f"{_fmt(f['prepass_seconds'], 1)} pre-pass + {epochs}"
        lines.append(f"| {arm} | {_fmt(f['samples_per_second'])} | {_fmt(f.get('samples_per_cpu_second'))} | "
                     f"{_fmt(f['supervised_tokens_per_second'], 0)} | "
                     f"{_fmt(100 * f['padding_fraction'] if f['padding_fraction'] is not None else None, 1, '%')} | "
                     f"{calls} | {_fmt(memory)} | {epochs} | {_fmt(f['epoch_2_over_1_speedup'], 2, 'x')} | "
                     f"{_fmt(100 * f['mfu'] if f.get('mfu') is not None else None, 1, '%')} |")
    for pair, r in report["ratios"].items():
        memory = r["peak_gpu_memory_bytes"] if gpu else r["peak_rss_bytes"]
        lines.append(f"| {pair} | {_fmt(r['samples_per_second'], 2, 'x')} | "
                     f"{_fmt(r.get('samples_per_cpu_second'), 2, 'x')} | "
                     f"{_fmt(r['supervised_tokens_per_second'], 2, 'x')} | | | {_fmt(memory, 2, 'x')} | | | |")
    return "\n".join(lines)
