"""Training throughput: TRL's documented SFTTrainer VLM recipe beside vlmtune, same data, same LoRA.

Each arm runs in its own Python process (so peak memory is per arm) on the same synthetic data
(one image + a 16-340 token question + a short answer per sample) and the same LoRA settings
(r16, alpha 32, dropout 0.05, the language model's linear layers), then one JSON is written:

    python bench/train_throughput.py --arch tiny --image-size 56 --steps 6 --warmup-steps 2 \
        --batch-size 4 --num-samples 32 --out bench/results/cpu-tiny-smoke.json
    python bench/train_throughput.py --arch qwen2-vl-2b --quant none --out bench/results/h100-bf16.json

Throughput is measured between the end of step `--warmup-steps` and the end of the last step with a
TrainerCallback in both arms (the final checkpoint save is outside that window). Token rates are the
arm's mean non-pad (or supervised) tokens per sample times its samples/s; the per-sample counts come
from the arm's own batching: TRL's collator (trainer.data_collator) run once over the data before
training, and vlmtune's prepared examples (train_results.json).

Internal entry points (used by the parent process): `_prepare SPEC.json` and `_arm SPEC.json`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_REFERENCE = ROOT.parent / "shared" / "reference" / "qwen2_vl_2b"
DEFAULT_TOKENIZER_REFERENCE = ROOT.parent / "shared" / "reference" / "qwen2_5_vl_7b_instruct"

LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
# The language model's linear layers only ("all-linear" would also hit the vision tower and projector).
TRL_TARGET_REGEX = r"^model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
ARMS = ("trl", "vlmtune")
GIB = 1024**3

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
_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple")
_SHAPES = ("circle", "square", "triangle")


# ----------------------------------------------------------------------------------------------- helpers
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _peak_rss() -> dict:
    """ru_maxrss is in KiB on Linux (bytes on macOS)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return {
        "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
        "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale,
    }


def _cpu_name() -> str:
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


def _versions() -> dict:
    import importlib

    out = {}
    for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "vlmtune"):
        try:
            module = importlib.import_module(name)
            out[name] = getattr(module, "__version__", "unknown")
        except Exception as e:  # noqa: BLE001  (bitsandbytes may fail to import for many reasons)
            out[name] = None if isinstance(e, ImportError) else f"import failed: {e.__class__.__name__}"
    return out


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return _cpu_name()


def _read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _write_json(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- model
def build_model_dir(arch: str, out: Path, reference: Path, tokenizer_reference: Path, seed: int) -> dict:
    """A local model folder (random weights) + processor that AutoModel/AutoProcessor load offline."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    if arch == "tiny":
        from vlmtune.demo import build_tiny_model_dir

        build_tiny_model_dir(out, "qwen2_vl", seed=seed)
        return {"arch": arch, "family": "qwen2_vl"}
    if arch != "qwen2-vl-2b":
        raise ValueError(f"unknown arch {arch!r}")
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        GenerationConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    config = AutoConfig.from_pretrained(reference)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialising 2B parameters on a GPU takes seconds
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    gen = reference / "generation_config.json"
    if gen.is_file():
        model.generation_config = GenerationConfig.from_pretrained(reference)
    model.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_reference)
    template = _read_json(tokenizer_reference / "chat_template.json")["chat_template"]
    pp = _read_json(reference / "preprocessor_config.json")
    keys = ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
    image_processor = Qwen2VLImageProcessor(**{k: pp[k] for k in keys if k in pp})
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(), chat_template=template)
    processor.save_pretrained(out)
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    if image_id != config.image_token_id:
        raise RuntimeError(f"tokenizer <|image_pad|> id {image_id} != config image_token_id {config.image_token_id}")
    return {"arch": arch, "family": "qwen2_vl", "parameters": n_params, "config": str(reference),
            "tokenizer": str(tokenizer_reference)}


# ----------------------------------------------------------------------------------------------- data
def make_data(data_dir: Path, tokenizer, n: int, image_size: int, seed: int, q_min: int = 16,
              q_max: int = 340) -> dict:
    """N samples: one PNG image, a question of q_min..q_max tokens (of this tokenizer), a short answer."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    images = data_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows, q_lens, a_lens = [], [], []
    for i in range(n):
        # image: a plain background with three coloured shapes (small PNGs, deterministic)
        bg = tuple(rng.randrange(256) for _ in range(3))
        img = Image.new("RGB", (image_size, image_size), bg)
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = rng.randrange(image_size // 2), rng.randrange(image_size // 2)
            x1, y1 = x0 + rng.randrange(4, image_size // 2), y0 + rng.randrange(4, image_size // 2)
            fill = tuple(rng.randrange(256) for _ in range(3))
            kind = rng.choice(_SHAPES)
            if kind == "circle":
                draw.ellipse((x0, y0, x1, y1), fill=fill)
            elif kind == "square":
                draw.rectangle((x0, y0, x1, y1), fill=fill)
            else:
                draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)
        name = f"images/img_{i:05d}.png"
        img.save(data_dir / name, optimize=False)
        # question: exactly `target` tokens of random words, cut on a token boundary, plus "?"
        target = rng.randint(q_min, q_max)
        text = " ".join(rng.choice(_WORDS) for _ in range(target + 8))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max(target - 1, 1)]
        question = tokenizer.decode(ids).strip() + "?"
        answer = f"The picture shows a {rng.choice(_COLOURS)} {rng.choice(_SHAPES)} on the {rng.choice(['left', 'right'])}."
        q_lens.append(len(tokenizer(question, add_special_tokens=False)["input_ids"]))
        a_lens.append(len(tokenizer(answer, add_special_tokens=False)["input_ids"]))
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": name}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]})
    with open(data_dir / "train.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {
        "num_samples": n, "image_size": image_size, "seed": seed,
        "question_tokens": {"min": min(q_lens), "mean": sum(q_lens) / n, "max": max(q_lens)},
        "answer_tokens": {"min": min(a_lens), "mean": sum(a_lens) / n, "max": max(a_lens)},
    }


def trl_dataset(data_dir: Path):
    """The same rows in TRL's documented VLM layout: typed-content "messages" + an "images" column."""
    import datasets

    messages, images = [], []
    for line in (data_dir / "train.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        paths, msgs = [], []
        for m in row["messages"]:
            content = []
            for part in m["content"]:
                if part["type"] == "image":
                    paths.append(str(data_dir / part["image"]))
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
    if not (marker.is_file() and _read_json(marker).get("key") == model_key):
        t0 = time.perf_counter()
        info = build_model_dir(spec["arch"], model_dir, Path(spec["reference"]), Path(spec["tokenizer_reference"]),
                               spec["seed"])
        info["build_seconds"] = time.perf_counter() - t0
        _write_json(marker, {"key": model_key, "info": info})
        print(f"built model folder {model_dir} in {info['build_seconds']:.1f}s", flush=True)
    data_key = {**model_key, **{k: spec[k] for k in ("num_samples", "image_size", "data_seed")}}
    dmarker = data_dir / "bench-data.json"
    if not (dmarker.is_file() and _read_json(dmarker).get("key") == data_key):
        processor = AutoProcessor.from_pretrained(model_dir)
        info = make_data(data_dir, processor.tokenizer, spec["num_samples"], spec["image_size"], spec["data_seed"])
        size = processor.image_processor.size  # the saved processor's pixel bounds, handed to vlmtune as-is
        info["pixels"] = {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}
        _write_json(dmarker, {"key": data_key, "info": info})
        print(f"wrote {spec['num_samples']} samples to {data_dir}", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------- timing
def make_step_timer(warmup: int):
    """A TrainerCallback that records the wall clock at the end of step `warmup` and of the last step."""
    import torch
    from transformers import TrainerCallback

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.warmup = warmup
            self.t_begin = self.t_warm = self.t_last = None
            self.last_step = 0
            self.max_steps = None

        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            self.t_begin = time.perf_counter()
            self.max_steps = state.max_steps
            if self.warmup == 0:
                self.t_warm = self.t_begin

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.warmup or state.global_step >= state.max_steps:
                sync()
                now = time.perf_counter()
                if state.global_step == self.warmup:
                    self.t_warm = now
                self.t_last, self.last_step = now, state.global_step

        def summary(self, batch_size: int) -> dict:
            measured_steps = self.last_step - self.warmup
            if self.t_warm is None or measured_steps <= 0:
                return {"ok": False, "warmup_steps": self.warmup, "last_step": self.last_step}
            seconds = self.t_last - self.t_warm
            return {
                "ok": True, "warmup_steps": self.warmup, "measured_steps": measured_steps,
                "measured_samples": measured_steps * batch_size, "measured_seconds": seconds,
                "warmup_seconds": self.t_warm - self.t_begin, "all_steps_seconds": self.t_last - self.t_begin,
                "samples_per_second": measured_steps * batch_size / seconds,
            }

    return StepTimer()


def _trainable(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora_modules = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    vision_lora = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A") and ".visual." in n)
    return {"trainable_parameters": trainable, "lora_modules": lora_modules, "lora_modules_in_vision": vision_lora}


def _effective(trainer) -> dict:
    model = trainer.model
    args = trainer.args
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    return {
        "gradient_checkpointing": bool(getattr(base, "is_gradient_checkpointing", False)),
        "args_gradient_checkpointing": getattr(args, "activation_checkpointing", args.gradient_checkpointing),
        "bf16": args.bf16, "fp16": args.fp16,
        "parameter_dtypes": dtypes,
        "attn_implementation": getattr(base.config, "_attn_implementation", None),
        "dataloader_num_workers": args.dataloader_num_workers,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate, "max_steps": args.max_steps,
        "collator": type(trainer.data_collator).__name__,
        **_trainable(model),
    }


# ----------------------------------------------------------------------------------------------- arms
def run_trl(spec: dict) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoProcessor
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    model_dir, data_dir, B = spec["model_dir"], Path(spec["data_dir"]), spec["batch_size"]
    ds = trl_dataset(data_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    kwargs = dict(
        output_dir=str(Path(spec["run_dir"])),
        per_device_train_batch_size=B,
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        learning_rate=spec["learning_rate"],
        max_length=None,  # TRL's default 1024 would cut samples with image tokens
        gradient_checkpointing=spec["gradient_checkpointing"],
        seed=spec["seed"],
        report_to="none",
        # Precision must match vlmtune's: bf16 weights on a bf16 GPU, fp32 on a CPU.
        model_init_kwargs={"dtype": "bfloat16" if cuda else "float32"},
    )
    if not cuda:
        kwargs.update(use_cpu=True, bf16=False)
    quantization_config = None
    if spec["quant"] == "4bit":
        from transformers import BitsAndBytesConfig

        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["model.visual", "lm_head"],
        )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=TRL_TARGET_REGEX, task_type="CAUSAL_LM")
    t0 = time.perf_counter()
    trainer_kwargs = {"quantization_config": quantization_config} if quantization_config is not None else {}
    trainer = SFTTrainer(model=model_dir, args=SFTConfig(**kwargs), train_dataset=ds, processing_class=processor,
                         peft_config=peft_config, **trainer_kwargs)
    if quantization_config is not None and not cuda:
        for module in trainer.model.modules():  # STACK-NOTES: CPU 4-bit repacking breaks training
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    setup_seconds = time.perf_counter() - t0

    # Count what TRL's own collator produces, once, outside the timed region.
    t0 = time.perf_counter()
    non_pad = supervised = padded = image_tokens = 0
    image_id = getattr(trainer.model.config, "image_token_id", None)
    for start in range(0, len(ds), B):
        batch = trainer.data_collator([ds[i] for i in range(start, min(start + B, len(ds)))])
        non_pad += int(batch["attention_mask"].sum())
        supervised += int((batch["labels"] != -100).sum())
        padded += batch["input_ids"].numel()
        if image_id is not None:
            image_tokens += int((batch["input_ids"] == image_id).sum())
    count_seconds = time.perf_counter() - t0

    timer = make_step_timer(spec["warmup_steps"])
    trainer.add_callback(timer)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    output = trainer.train()
    train_wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else None
    reserved = torch.cuda.max_memory_reserved() if cuda else None
    n = len(ds)
    return {
        "timer": timer.summary(B),
        "train_runtime": output.metrics.get("train_runtime"),
        "train_wall_seconds": train_wall,
        "train_loss": output.metrics.get("train_loss"),
        "setup_seconds": setup_seconds,
        "token_count_seconds": count_seconds,
        "train_examples": n,
        "tokens_per_epoch": non_pad,
        "supervised_tokens_per_epoch": supervised,
        "image_tokens_per_epoch": image_tokens,
        "padded_tokens_per_epoch_in_order": padded,
        "token_source": "trainer.data_collator over the training data in order, batch size B (attention_mask sum; "
                        "labels != -100)",
        "peak_gpu_memory_bytes": peak,
        "peak_gpu_memory_reserved_bytes": reserved,
        "effective": _effective(trainer),
    }


def write_recipe(spec: dict, path: Path) -> Path:
    import yaml

    recipe = {
        "model": {"name_or_path": str(spec["model_dir"]), "dtype": "auto", "attn_implementation": "auto"},
        "quantization": {"mode": spec["quant"]},
        "lora": dict(LORA),
        "data": {"train": str(Path(spec["data_dir"]) / "train.jsonl"), "max_length": 4096,
                 "max_pixels": spec["max_pixels"], "min_pixels": spec["min_pixels"],
                 "num_workers": spec.get("num_workers")},
        "train": {"max_steps": spec["steps"], "per_device_train_batch_size": spec["batch_size"],
                  "gradient_accumulation_steps": 1, "learning_rate": spec["learning_rate"], "warmup_ratio": 0.0,
                  "gradient_checkpointing": spec["gradient_checkpointing"], "logging_steps": 10,
                  "save_steps": 100000, "seed": spec["seed"], "use_cpu": False},
        "output_dir": str(spec["run_dir"]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def recipe_overrides(spec: dict) -> list[str]:
    return [f"train.max_steps={spec['steps']}", f"train.per_device_train_batch_size={spec['batch_size']}"]


def run_vlmtune(spec: dict) -> dict:
    """vlmtune's Python API, with the same step timer added to the trainer that vlmtune.train builds."""
    import torch

    import vlmtune
    import vlmtune.training as vt

    timer = make_step_timer(spec["warmup_steps"])
    captured: dict = {}
    original = vt.build_trainer

    def build_trainer_with_timer(*args, **kwargs):  # vlmtune.train takes no callbacks; attach ours here
        trainer, report = original(*args, **kwargs)
        trainer.add_callback(timer)
        captured["trainer"] = trainer
        return trainer, report

    vt.build_trainer = build_trainer_with_timer
    recipe_path = write_recipe(spec, Path(spec["run_dir"]).parent / "vlmtune-recipe.yaml")
    recipe = vlmtune.load_recipe(recipe_path, overrides=recipe_overrides(spec))
    t0 = time.perf_counter()
    result = vlmtune.train(recipe, overwrite=True)  # the arm's own scratch folder: a re-run replaces it
    total = time.perf_counter() - t0
    m = result.metrics
    cuda = torch.cuda.is_available()
    peak = torch.cuda.max_memory_allocated() if cuda else None  # vlmtune.train resets it right before training
    trainer = captured.get("trainer")
    return {
        "timer": timer.summary(spec["batch_size"]),
        "train_runtime": m.get("train_runtime"),
        "train_wall_seconds": m.get("wall_seconds"),
        "train_loss": m.get("train_loss"),
        "setup_seconds": total - (m.get("wall_seconds") or 0.0),
        "train_examples": m.get("train_examples"),
        "tokens_per_epoch": m.get("train_tokens_per_epoch"),
        "supervised_tokens_per_epoch": m.get("train_supervised_tokens_per_epoch"),
        "token_source": "vlmtune train_results.json (prepared examples, unpadded)",
        "peak_gpu_memory_bytes": peak,
        "peak_gpu_memory_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "vlmtune_metrics": m,
        "recipe": str(recipe_path),
        "effective": _effective(trainer) if trainer is not None else None,
    }


def cmd_arm(spec: dict) -> int:
    start = time.perf_counter()
    if spec.get("torch_threads"):
        import torch

        torch.set_num_threads(spec["torch_threads"])
    runner = {"trl": run_trl, "vlmtune": run_vlmtune}[spec["arm"]]
    result = runner(spec)
    result["peak_rss_bytes"] = _peak_rss()  # before anything below forks (platform.processor runs `uname -p`)
    result["process_seconds_in_arm"] = time.perf_counter() - start
    result["device"] = _device_name()
    result["versions"] = _versions()
    _write_json(Path(spec["result"]), result)
    return 0


# ----------------------------------------------------------------------------------------------- parent
def _run_child(argv: list[str], log: Path, timeout: float | None) -> tuple[int, float, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
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


def _figures(arm: str, raw: dict, basis: str) -> dict:
    """The per-arm numbers the report compares."""
    timer = raw.get("timer") or {}
    n = raw.get("train_examples") or 0
    tokens, supervised = raw.get("tokens_per_epoch") or 0, raw.get("supervised_tokens_per_epoch") or 0
    if basis == "steady":
        sps = timer["samples_per_second"]
    else:
        runtime = raw.get("train_runtime") or 0.0
        sps = raw["_samples_total"] / runtime if runtime else 0.0
    per_sample = tokens / n if n else 0.0
    sup_per_sample = supervised / n if n else 0.0
    rss = raw.get("peak_rss_bytes") or {}
    return {
        "samples_per_second": sps,
        "tokens_per_second": sps * per_sample,
        "supervised_tokens_per_second": sps * sup_per_sample,
        "supervised_fraction": supervised / tokens if tokens else None,
        "tokens_per_sample": per_sample,
        "supervised_tokens_per_sample": sup_per_sample,
        "peak_gpu_memory_bytes": raw.get("peak_gpu_memory_bytes"),
        "peak_gpu_memory_gib": (raw["peak_gpu_memory_bytes"] / GIB) if raw.get("peak_gpu_memory_bytes") else None,
        "peak_rss_bytes": rss.get("self"),
        "peak_rss_children_bytes": rss.get("children"),
        "measured_seconds": timer.get("measured_seconds"),
        "train_runtime_seconds": raw.get("train_runtime"),
        "wall_seconds": raw.get("_process_wall_seconds"),
        "train_loss": raw.get("train_loss"),
    }


def _ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def _fmt(x, digits=2, suffix=""):
    if x is None:
        return "–"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return f"{x:,.{digits}f}{suffix}"


def markdown_table(report: dict) -> str:
    lines = [
        f"device: {report['device']} | arch {report['settings']['arch']} | quant {report['settings']['quant']} | "
        f"batch {report['settings']['batch_size']} | {report['settings']['image_size']} px | gradient checkpointing "
        f"{report['settings']['gradient_checkpointing']} | timing: {report['timing']['basis']}",
        "",
        "| arm | samples/s | non-pad tok/s | supervised tok/s | supervised fraction | peak GPU GiB | peak RSS GiB "
        "| measured s | train_runtime s | process wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, fig in report["arms"].items():
        if "error" in fig:
            lines.append(f"| {arm} | failed: {fig['error'][:60]} |" + " |" * 8)
            continue
        rss = fig["peak_rss_bytes"] / GIB if fig.get("peak_rss_bytes") else None
        lines.append(
            f"| {arm} | {_fmt(fig['samples_per_second'])} | {_fmt(fig['tokens_per_second'], 0)} | "
            f"{_fmt(fig['supervised_tokens_per_second'], 1)} | {_fmt(fig['supervised_fraction'], 3)} | "
            f"{_fmt(fig['peak_gpu_memory_gib'])} | {_fmt(rss)} | {_fmt(fig['measured_seconds'], 1)} | "
            f"{_fmt(fig['train_runtime_seconds'], 1)} | {_fmt(fig['wall_seconds'], 1)} |"
        )
    r = report.get("ratios_vlmtune_over_trl")
    if r:
        lines.append(
            f"| vlmtune/trl | {_fmt(r['samples_per_second'], 2, 'x')} | {_fmt(r['tokens_per_second'], 2, 'x')} | "
            f"{_fmt(r['supervised_tokens_per_second'], 2, 'x')} | {_fmt(r['supervised_fraction'], 3, 'x')} | "
            f"{_fmt(r['peak_gpu_memory_bytes'], 2, 'x')} | {_fmt(r['peak_rss_bytes'], 2, 'x')} | "
            f"{_fmt(r['measured_seconds'], 2, 'x')} | {_fmt(r['train_runtime_seconds'], 2, 'x')} | "
            f"{_fmt(r['wall_seconds'], 2, 'x')} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", choices=("tiny", "qwen2-vl-2b"), default="tiny")
    p.add_argument("--arms", default="trl,vlmtune", help="comma-separated subset of trl,vlmtune")
    p.add_argument("--quant", choices=("none", "4bit"), default="none")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="measured steps (after the warm-up)")
    p.add_argument("--warmup-steps", type=int, default=3, help="steps run before the timed window")
    p.add_argument("--num-samples", type=int, default=64, help="rounded up to a multiple of --batch-size")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--gradient-checkpointing", choices=("on", "off"), default="on")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vlmtune-mode", choices=("api", "cli"), default="api",
                   help="api: vlmtune.train() with the step timer; cli: `python -m vlmtune.cli sft`, timed by "
                        "train_runtime (then every arm is compared on train_runtime)")
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
    args = p.parse_args(argv)
    args.arm_list = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arm_list if a not in ARMS]
    if bad or not args.arm_list:
        p.error(f"--arms must name some of {', '.join(ARMS)}; got {args.arms!r}")
    for name in ("batch_size", "steps", "num_samples", "image_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup_steps < 0:
        p.error("--warmup-steps must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    n = -(-args.num_samples // args.batch_size) * args.batch_size  # no ragged last batch
    total_steps = args.warmup_steps + args.steps
    work = args.work_dir.resolve()
    model_dir = work / f"model-{args.arch}"
    data_dir = work / f"data-{args.arch}-n{n}-px{args.image_size}-seed{args.seed}"
    out = args.out or (HERE / "results" / f"{args.arch}-{args.quant}.json")
    gc = args.gradient_checkpointing == "on"
    prep = {"arch": args.arch, "seed": args.seed, "reference": str(args.reference.resolve()),
            "tokenizer_reference": str(args.tokenizer_reference.resolve()), "model_dir": str(model_dir),
            "data_dir": str(data_dir), "num_samples": n, "image_size": args.image_size, "data_seed": args.seed}
    work.mkdir(parents=True, exist_ok=True)
    prep_path = work / "prepare-spec.json"
    _write_json(prep_path, prep)
    print(f"preparing model ({args.arch}) and {n} samples in {work} ...", flush=True)
    rc, prep_wall, tail = _run_child([sys.executable, str(Path(__file__).resolve()), "_prepare", str(prep_path)],
                                     work / "prepare.log", None)
    if rc != 0:
        print(tail, file=sys.stderr)
        print(f"error: preparing model/data failed (rc {rc}); log: {work / 'prepare.log'}", file=sys.stderr)
        return 1
    data_info = _read_json(data_dir / "bench-data.json")["info"]
    min_pixels, max_pixels = data_info["pixels"]["min_pixels"], data_info["pixels"]["max_pixels"]
    model_info = _read_json(model_dir / "bench-model.json")["info"]

    tag = f"{args.arch}-{args.quant}-gc{args.gradient_checkpointing}-b{args.batch_size}"
    raws: dict[str, dict] = {}
    for arm in args.arm_list:
        run_dir = work / "runs" / tag / arm / "output"
        spec = {"arm": arm, "model_dir": str(model_dir), "data_dir": str(data_dir), "run_dir": str(run_dir),
                "batch_size": args.batch_size, "steps": total_steps, "warmup_steps": args.warmup_steps,
                "learning_rate": args.learning_rate, "quant": args.quant, "gradient_checkpointing": gc,
                "seed": args.seed, "min_pixels": min_pixels, "max_pixels": max_pixels,
                "num_workers": args.num_workers, "torch_threads": args.torch_threads,
                "result": str(run_dir.parent / "result.json")}
        spec_path = run_dir.parent / "spec.json"
        _write_json(spec_path, spec)
        Path(spec["result"]).unlink(missing_ok=True)
        log = run_dir.parent / "arm.log"
        cli = arm == "vlmtune" and args.vlmtune_mode == "cli"
        print(f"[{arm}] running {'vlmtune CLI' if cli else 'arm'} in its own process (log: {log}) ...", flush=True)
        if cli:
            recipe = write_recipe(spec, run_dir.parent / "vlmtune-recipe.yaml")
            argv = [sys.executable, "-m", "vlmtune.cli", "sft", str(recipe), *recipe_overrides(spec)]
        else:
            argv = [sys.executable, str(Path(__file__).resolve()), "_arm", str(spec_path)]
        rc, wall, tail = _run_child(argv, log, args.arm_timeout)
        if rc == 0 and cli:
            m = _read_json(run_dir / "train_results.json")
            raw = {"timer": None, "train_runtime": m.get("train_runtime"), "train_loss": m.get("train_loss"),
                   "train_examples": m.get("train_examples"), "tokens_per_epoch": m.get("train_tokens_per_epoch"),
                   "supervised_tokens_per_epoch": m.get("train_supervised_tokens_per_epoch"),
                   "peak_gpu_memory_bytes": m.get("peak_gpu_memory_bytes"), "vlmtune_metrics": m,
                   "peak_rss_bytes": {"self": None, "children": _peak_rss()["children"]},
                   "token_source": "vlmtune train_results.json", "recipe": str(recipe)}
        elif rc == 0:
            raw = _read_json(Path(spec["result"]))
        else:
            print(tail, file=sys.stderr)
            print(f"[{arm}] failed (rc {rc}); log: {log}", file=sys.stderr)
            raw = {"error": f"rc {rc}: " + (tail.strip().splitlines() or [""])[-1], "log_tail": tail}
        raw["_process_wall_seconds"] = wall
        raw["_samples_total"] = total_steps * args.batch_size
        raw["log"] = str(log)
        raws[arm] = raw
        if "error" not in raw:
            t = raw.get("timer") or {}
            print(f"[{arm}] done in {wall:.1f}s: "
                  f"{t.get('samples_per_second', float('nan')):.2f} samples/s after warm-up", flush=True)

    ok = {a: r for a, r in raws.items() if "error" not in r}
    steady = bool(ok) and all((r.get("timer") or {}).get("ok") for r in ok.values())
    basis = "steady" if steady else "train_runtime"
    arms = {}
    for arm, raw in raws.items():
        if "error" in raw:
            arms[arm] = {"error": raw["error"], "log": raw["log"], "wall_seconds": raw["_process_wall_seconds"]}
        else:
            arms[arm] = _figures(arm, raw, basis)
    ratios = None
    if "trl" in ok and "vlmtune" in ok:
        a, b = arms["vlmtune"], arms["trl"]
        ratios = {k: _ratio(a.get(k), b.get(k)) for k in (
            "samples_per_second", "tokens_per_second", "supervised_tokens_per_second", "supervised_fraction",
            "tokens_per_sample", "peak_gpu_memory_bytes", "peak_rss_bytes", "measured_seconds",
            "train_runtime_seconds", "wall_seconds")}
    device = next((r["device"] for r in ok.values() if r.get("device")), None)
    versions = next((r["versions"] for r in ok.values() if r.get("versions")), None)
    report = {
        "name": args.name or out.stem,
        "date": _now(),
        "device": device or _cpu_name(),
        "versions": versions,
        "python": platform.python_version(),
        "settings": {
            "arch": args.arch, "quant": args.quant, "arms": args.arm_list, "batch_size": args.batch_size,
            "gradient_accumulation_steps": 1, "warmup_steps": args.warmup_steps, "measured_steps": args.steps,
            "total_steps": total_steps, "num_samples": n, "image_size": args.image_size,
            "gradient_checkpointing": args.gradient_checkpointing, "learning_rate": args.learning_rate,
            "seed": args.seed, "lora": {**LORA, "trl_target_modules": TRL_TARGET_REGEX,
                                        "vlmtune_target_modules": "vlmtune default (language model linear layers)"},
            "precision": "bf16 weights + bf16 autocast on GPU; fp32 on CPU",
            "quantization": ("nf4, double quant, bf16 compute, skip model.visual and lm_head" if args.quant == "4bit"
                             else None),
            "pixels": {"min_pixels": min_pixels, "max_pixels": max_pixels},
            "vlmtune_mode": args.vlmtune_mode, "vlmtune_num_workers": args.num_workers,
            "torch_threads": args.torch_threads,
            "model": model_info, "data": data_info,
        },
        "timing": {
            "basis": basis,
            "description": (
                f"samples/s over steps {args.warmup_steps + 1}..{total_steps} (a TrainerCallback synchronises the "
                "GPU and reads the clock at the end of the warm-up step and of the last step, in both arms; the "
                "final checkpoint save is outside the window)" if basis == "steady" else
                f"samples/s = {total_steps} steps x batch / train_runtime for every arm (includes the warm-up "
                "steps and the final checkpoint save), because an arm had no step timer"),
            "tokens": "tokens/s = samples/s x the arm's mean non-pad tokens per sample (supervised: labels != "
                      "-100); TRL counted by running trainer.data_collator over the data once before training, "
                      "vlmtune from its prepared examples (train_results.json)",
            "peak_gpu_memory": "torch.cuda.max_memory_allocated() over trainer.train(), peak stats reset just "
                               "before it (model loading excluded) in both arms; null on a CPU",
            "peak_rss": "resource.getrusage(RUSAGE_SELF).ru_maxrss of the arm process, for reference; "
                        "peak_rss_children_bytes is RUSAGE_CHILDREN (forked DataLoader workers, whose RSS includes "
                        "pages shared with the arm process)",
            "wall_seconds": "the arm process from start to exit (imports, model load, data checks, training, save)",
        },
        "arms": arms,
        "ratios_vlmtune_over_trl": ratios,
        "raw": {a: {k: v for k, v in r.items() if k not in ("log_tail",)} for a, r in raws.items()},
        "total_seconds": time.perf_counter() - started,
    }
    _write_json(out, report)
    print()
    print(markdown_table(report))
    print(f"\nwrote {out}")
    return 0 if len(ok) == len(raws) else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("_prepare", "_arm"):
        spec = _read_json(Path(sys.argv[2]))
        sys.exit(cmd_prepare(spec) if sys.argv[1] == "_prepare" else cmd_arm(spec))
    sys.exit(main())
