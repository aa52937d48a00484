"""Synthetic data with a realistic length spread, the same rows in TRL's layout, and the `_prepare` step.

Per sample: 1 to 3 PNG images of different sizes (each side a multiple of 28 between a quarter of
`image_size` and `image_size`, so the processor keeps them as drawn), a question of 16 to 1,000 tokens and an
answer of 4 to 160 tokens of this tokenizer (both log-uniform: many short, a long tail), all deterministic
from the seed. `bench-samples.json` holds each sample's sequence length, supervised tokens and image patches
(what flops.py counts).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

from .common import read_json, write_json
from .model import build_model_dir

DATA_VERSION = 2  # bumped when the generated data changes, so old data folders are rebuilt
QUESTION_TOKENS = (16, 1000)
ANSWER_TOKENS = (4, 160)
IMAGES_PER_SAMPLE = (1, 3)
_WORDS = (
    "the a picture image photo shows small large red green blue yellow orange purple black white grey brown "
    "circle square triangle shape shapes left right top bottom middle corner edge near far above below under "
    "over between next to behind front house tree river road car city people dog cat table chair lamp book "
    "window door wall floor sky sun cloud rain water light dark bright round sharp long short tall wide "
    "what where which how many why when who is are was were there here this that these those do does did "
    "can could would should will describe count find tell explain compare look see notice please carefully "
    "one two three four five six seven eight nine ten first second third last every each some any all no "
    "colour color size position object objects scene background foreground part side and or but with without "
    "in on at of for from by about into through during before after again also only just very quite really "
    "question answer detail details thing things kind sort way place time day night morning evening"
).split()
_SHAPES = ("circle", "square", "triangle")


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return min(hi, max(lo, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))))


def _text(rng: random.Random, tokenizer, tokens: int, end: str) -> str:
    """Random words cut to `tokens` tokens of this tokenizer (the end mark included)."""
    words = " ".join(rng.choice(_WORDS) for _ in range(tokens + 8))
    ids = tokenizer(words, add_special_tokens=False)["input_ids"][: max(tokens - 1, 1)]
    return tokenizer.decode(ids).strip() + end


def _draw(rng: random.Random, width: int, height: int):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.randrange(width // 2), rng.randrange(height // 2)
        x1, y1 = x0 + rng.randrange(4, width // 2), y0 + rng.randrange(4, height // 2)
        fill = tuple(rng.randrange(256) for _ in range(3))
        kind = rng.choice(_SHAPES)
        if kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)
    return img


def _stats(values: list[int]) -> dict:
    ordered = sorted(values)
    return {"min": ordered[0], "mean": sum(ordered) / len(ordered), "median": ordered[len(ordered) // 2],
            "max": ordered[-1]}


def make_data(data_dir: Path, tokenizer, n: int, image_size: int, seed: int, image_processor=None) -> dict:
    """N samples into data_dir (train.jsonl + images/); returns the data statistics."""
    rng = random.Random(seed)
    data_dir = Path(data_dir)
    (data_dir / "images").mkdir(parents=True, exist_ok=True)
    sides = [s for s in range(56, image_size + 1, 28) if s >= image_size // 4] or [max(56, image_size // 28 * 28)]
    patch = getattr(image_processor, "patch_size", 14) or 14
    rows, samples, q_lens, a_lens, n_images = [], [], [], [], []
    for i in range(n):
        content, patches = [], []
        for j in range(rng.randint(*IMAGES_PER_SAMPLE)):
            width, height = rng.choice(sides), rng.choice(sides)
            name = f"images/img_{i:05d}_{j}.png"
            _draw(rng, width, height).save(data_dir / name, optimize=False)
            content.append({"type": "image", "image": name})
            patches.append(_patches(image_processor, width, height, patch))
        question = _text(rng, tokenizer, _log_uniform(rng, *QUESTION_TOKENS), "?")
        answer = _text(rng, tokenizer, _log_uniform(rng, *ANSWER_TOKENS), ".")
        content.append({"type": "text", "text": question})
        messages = [{"role": "user", "content": content},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        rows.append({"messages": messages})
        q_lens.append(len(tokenizer(question, add_special_tokens=False)["input_ids"]))
        a_len = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
        a_lens.append(a_len)
        n_images.append(len(patches))
        samples.append({"tokens": _sequence_length(tokenizer, messages, patches), "supervised": a_len + 1,
                        "patches": patches})
    with open(data_dir / "train.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_json(data_dir / "bench-samples.json", samples)
    return {
        "num_samples": n, "image_size": image_size, "seed": seed, "data_version": DATA_VERSION,
        "question_tokens": _stats(q_lens), "answer_tokens": _stats(a_lens), "images_per_sample": _stats(n_images),
        "image_sides": [sides[0], sides[-1]],
        "image_tokens_per_sample": _stats([sum(p // 4 for p in s["patches"]) for s in samples]),
        "sequence_tokens": _stats([s["tokens"] for s in samples]),
    }


def _patches(image_processor, width: int, height: int, patch: int) -> int:
    """Vision patches of one image after the processor's resize (4 patches make one image token)."""
    if image_processor is None:
        return (height // patch) * (width // patch)
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    size = image_processor.size
    h, w = smart_resize(height, width, factor=patch * 2, min_pixels=size["shortest_edge"],
                        max_pixels=size["longest_edge"])
    return (h // patch) * (w // patch)


def _sequence_length(tokenizer, messages: list[dict], patches: list[int]) -> int:
    """Tokens of the templated sample with each image's placeholder expanded to its image tokens."""
    typed = [{"role": m["role"], "content": [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]}
             for m in messages]
    text = tokenizer.apply_chat_template(typed, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) - len(patches) + sum(p // 4 for p in patches)


def trl_dataset(data_dir: Path):
    """The same rows in TRL's documented VLM layout: typed-content "messages" + an "images" column."""
    import datasets

    messages, images = [], []
    for line in (Path(data_dir) / "train.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        paths, msgs = [], []
        for m in row["messages"]:
            content = []
            for part in m["content"]:
                if part["type"] == "image":
                    paths.append(str(Path(data_dir) / part["image"]))
                    content.append({"type": "image"})
                else:
                    content.append({"type": "text", "text": part["text"]})
            msgs.append({"role": m["role"], "content": content})
        messages.append(msgs)
        images.append(paths)
    ds = datasets.Dataset.from_dict({"messages": messages, "images": images})
    return ds.cast_column("images", datasets.List(datasets.Image()))  # decoded to PIL images on access


def cmd_prepare(spec: dict) -> int:
    """Build (or reuse) the model folder and the data folder described by the spec."""
    from transformers import AutoProcessor

    model_dir, data_dir = Path(spec["model_dir"]), Path(spec["data_dir"])
    model_key = {k: spec[k] for k in ("arch", "seed", "reference", "tokenizer_reference")}
    marker = model_dir / "bench-model.json"
    if not (marker.is_file() and read_json(marker).get("key") == model_key):
        t0 = time.perf_counter()
        info = build_model_dir(spec["arch"], model_dir, Path(spec["reference"]), Path(spec["tokenizer_reference"]),
                               spec["seed"])
        info["build_seconds"] = time.perf_counter() - t0
        write_json(marker, {"key": model_key, "info": info})
        print(f"built model folder {model_dir} in {info['build_seconds']:.1f}s", flush=True)
    data_key = {**model_key, **{k: spec[k] for k in ("num_samples", "image_size", "data_seed")},
                "data_version": DATA_VERSION}
    dmarker = data_dir / "bench-data.json"
    if not (dmarker.is_file() and read_json(dmarker).get("key") == data_key):
        processor = AutoProcessor.from_pretrained(model_dir)
        info = make_data(data_dir, processor.tokenizer, spec["num_samples"], spec["image_size"], spec["data_seed"],
                         image_processor=processor.image_processor)
        size = processor.image_processor.size  # the saved processor's pixel bounds, handed to vlmtune as-is
        info["pixels"] = {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}
        write_json(dmarker, {"key": data_key, "info": info})
        print(f"wrote {spec['num_samples']} samples to {data_dir}", flush=True)
    return 0
