"""Helpers shared by the benchmark's modules and the GPU check scripts: clock, device, versions, JSON files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # bench/
ROOT = HERE.parent
DEFAULT_REFERENCE = ROOT.parent / "shared" / "reference" / "qwen2_vl_2b"
DEFAULT_TOKENIZER_REFERENCE = ROOT.parent / "shared" / "reference" / "qwen2_5_vl_7b_instruct"
GIB = 1024**3
# dense bf16 peak FLOP/s by device name fragment (the MFU denominator)
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def peak_rss() -> dict:
    """ru_maxrss is in KiB on Linux (bytes on macOS)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale}


def cpu_name() -> str:
    name = platform.processor()
    if not name or name in ("x86_64", "aarch64", "arm64", "i386"):
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return f"cpu: {name or platform.machine()} ({os.cpu_count()} cores)"


def versions() -> dict:
    import importlib

    out = {}
    for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "vlmtune"):
        try:
            module = importlib.import_module(name)
            out[name] = getattr(module, "__version__", "unknown")
        except Exception as e:  # noqa: BLE001  (bitsandbytes may fail to import for many reasons)
            out[name] = None if isinstance(e, ImportError) else f"import failed: {e.__class__.__name__}"
    return out


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return cpu_name()


def bf16_peak(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_json(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
