"""Time `vlmtune validate` on a generated dataset of 10,000 rows, each with its own image file.

    .venv/bin/python bench/validate_speed.py [--rows 10000] [--model reference|tiny] [--out bench/results/validate-10k-cpu.json]

`--model reference` uses the real Qwen2.5-VL-7B tokenizer, template and processor from ../shared/reference
(a config only; no weights are needed to validate), `tiny` the built-in tiny Qwen2-VL.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "qwen2_5_vl_7b_instruct"
WORDS = "what which colour shape left right many the is are there in on of a picture image document table".split()


def make_data(folder: Path, rows: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True)
    lines = []
    for i in range(rows):
        w, h = rng.choice([(448, 448), (640, 480), (320, 640), (1024, 768), (224, 224)])
        Image.new("RGB", (w, h), (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(
            folder / "images" / f"{i:05d}.png")
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
        turns = [{"role": "user", "content": [{"type": "image", "image": f"images/{i:05d}.png"},
                                              {"type": "text", "text": question + "?"}]},
                 {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30)))}]
        if i % 5 == 0:
            turns += [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Nothing more."}]
        lines.append(json.dumps({"messages": turns}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--model", choices=["reference", "tiny"], default="reference" if REFERENCE.is_dir() else "tiny")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "validate-10k-cpu.json"))
    args = ap.parse_args()
    import vlmtune

    tmp = Path(tempfile.mkdtemp(prefix="vlmtune-validate-bench-"))
    try:
        t0 = time.perf_counter()
        data = make_data(tmp / "data", args.rows)
        made = time.perf_counter() - t0
        model = str(REFERENCE) if args.model == "reference" else "builtin:tiny-qwen2-vl"
        recipe = vlmtune.load_recipe(None, overrides={"model.name_or_path": model, "data.train": str(data),
                                                      "data.max_length": 4096, "data.max_pixels": 1003520})
        t0 = time.perf_counter()
        report = vlmtune.validate(recipe)
        seconds = time.perf_counter() - t0
        train = report.splits["train"]
        result = {
            "benchmark": "validate", "rows": args.rows, "model": args.model, "seconds": round(seconds, 2),
            "rows_per_second": round(args.rows / seconds, 1), "data_generation_seconds": round(made, 1),
            "examples": len(train.examples), "images": train.num_images, "tokens": train.num_tokens,
            "problems": len(report.problems), "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs", "python": sys.version.split()[0], "vlmtune": vlmtune.__version__,
            "date": time.strftime("%Y-%m-%d"),
        }
        print(json.dumps(result, indent=2))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
