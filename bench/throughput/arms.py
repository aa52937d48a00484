"""The arms, each run in its own process by `train_throughput.py _arm SPEC.json`:

- `trl`: TRL's documented SFTTrainer recipe for VLMs with its defaults (its collator, gradient checkpointing on,
  no workers); only what must match is set (batch size, epochs, learning rate, precision, LoRA, max_length=None).
- `vlmtune`: `vlmtune.train` on a recipe with vlmtune's defaults (batch size, epochs, learning rate, no
  gradient accumulation set to match).
- `vlmtune-fast`: the same plus every switch of issue 10 (FAST_FIELDS); a field this vlmtune's recipe schema
  does not know yet is skipped and recorded.
Each returns its raw figures (the probe's epochs, counts, memory, effective settings)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .probes import effective, make_probe

ARMS = ("trl", "vlmtune", "vlmtune-fast")
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
# The language model's linear layers only ("all-linear" would also hit the vision tower and projector).
TRL_TARGET_REGEX = r"^model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
VISION_PREFIX = "model.visual"  # Qwen2-VL's tower (vlmtune.families' qwen2_vl record says the same)
FAST_FIELDS = {
    "train.packing": True, "train.loss_on_labels_only": True, "data.cache": True,
    "train.cache_vision_features": True, "train.gradient_checkpointing": "auto", "train.group_by_length": True,
    "train.liger_kernel": "auto",
}


def _memory(cuda: bool) -> dict:
    import torch

    if not cuda:
        return {"peak_gpu_memory_bytes": None, "peak_gpu_memory_reserved_bytes": None}
    return {"peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(),
            "peak_gpu_memory_reserved_bytes": torch.cuda.max_memory_reserved()}


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def run_trl(spec: dict) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoProcessor
    from trl import SFTConfig, SFTTrainer

    from .data import trl_dataset

    cuda = torch.cuda.is_available()
    ds = trl_dataset(Path(spec["data_dir"]))
    processor = AutoProcessor.from_pretrained(spec["model_dir"])
    kwargs = dict(
        output_dir=str(Path(spec["run_dir"])), per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, num_train_epochs=spec["epochs"], learning_rate=spec["learning_rate"],
        max_length=None,  # TRL's default 1024 would cut samples with image tokens
        seed=spec["seed"], report_to="none",
        # Precision must match vlmtune's: bf16 weights on a bf16 GPU, fp32 on a CPU.
        model_init_kwargs={"dtype": "bfloat16" if cuda else "float32"},
    )
    if spec["gradient_checkpointing"] in ("on", "off"):  # else TRL's default (on)
        kwargs["gradient_checkpointing"] = spec["gradient_checkpointing"] == "on"
    if not cuda:
        kwargs.update(use_cpu=True, bf16=False)
    trainer_kwargs = {}
    if spec["quant"] == "4bit":
        from transformers import BitsAndBytesConfig

        trainer_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["model.visual", "lm_head"])
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=TRL_TARGET_REGEX, task_type="CAUSAL_LM")
    t0 = time.perf_counter()
    trainer = SFTTrainer(model=spec["model_dir"], args=SFTConfig(**kwargs), train_dataset=ds,
                         processing_class=processor, peft_config=peft_config, **trainer_kwargs)
    if trainer_kwargs and not cuda:
        for module in trainer.model.modules():  # STACK-NOTES: CPU 4-bit repacking breaks training
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    setup_seconds = time.perf_counter() - t0
    probe = make_probe(_pad_id(processor.tokenizer), VISION_PREFIX, spec.get("profile_step"))
    probe.attach(trainer)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    output = trainer.train()
    return {"probe": probe.summary(), "train_runtime": output.metrics.get("train_runtime"),
            "train_loss": output.metrics.get("train_loss"), "setup_seconds": setup_seconds,
            "train_examples": len(ds), **_memory(cuda), "effective": effective(trainer)}


def schema_accepts(path: str, value) -> bool:
    """Whether this vlmtune's recipe schema has `path` and (for a string value) takes that string."""
    import typing

    from vlmtune.config.schema import CHOICES, schema

    hints = schema()
    if path not in hints:
        return False
    if not isinstance(value, str):
        return True
    if path in CHOICES:
        return value in CHOICES[path]
    hint = hints[path]
    return hint is str or str in typing.get_args(hint)


def arm_fields(spec: dict) -> tuple[dict, list[str]]:
    """The recipe fields the arm sets beyond the shared ones, and the FAST_FIELDS skipped (unknown to the schema)."""
    if spec["arm"] != "vlmtune-fast":
        return {}, []
    fields, skipped = {}, []
    for path, value in FAST_FIELDS.items():
        if path == "train.gradient_checkpointing" and spec["gradient_checkpointing"] in ("on", "off"):
            value = spec["gradient_checkpointing"] == "on"
        if schema_accepts(path, value):
            fields[path] = value
        elif path == "train.gradient_checkpointing" and schema_accepts(path, False):
            fields[path] = False  # no `auto` yet: off, as auto would choose with memory to spare
            skipped.append(f"{path}: auto (unknown; false used)")
        else:
            skipped.append(path)
    fields["data.max_length"] = spec["pack_capacity"]
    fields["train.per_device_train_batch_size"] = spec["packed_batch_size"]
    return fields, skipped


def write_recipe(spec: dict, path: Path, fields: dict | None = None) -> Path:
    """A recipe for the bench's model and data; `fields` (dotted path -> value) go on top. `spec` with `steps`
    trains that many steps (the GPU DeepSpeed check), else `epochs` epochs."""
    import yaml

    train = {"per_device_train_batch_size": spec["batch_size"], "gradient_accumulation_steps": 1,
             "learning_rate": spec["learning_rate"], "warmup_ratio": 0.0, "logging_steps": 10,
             "save_steps": 100000, "seed": spec["seed"], "use_cpu": False}
    if spec.get("steps"):
        train["max_steps"] = spec["steps"]
    else:
        train["num_train_epochs"] = spec["epochs"]
    gc = spec.get("gradient_checkpointing")
    if isinstance(gc, bool) or gc in ("on", "off"):
        train["gradient_checkpointing"] = gc if isinstance(gc, bool) else gc == "on"
    recipe = {
        "model": {"name_or_path": str(spec["model_dir"]), "dtype": "auto", "attn_implementation": "auto"},
        "quantization": {"mode": spec["quant"]},
        "lora": dict(LORA),
        "data": {"train": str(Path(spec["data_dir"]) / "train.jsonl"), "max_length": 4096,
                 "max_pixels": spec["max_pixels"], "min_pixels": spec["min_pixels"],
                 "num_workers": spec.get("num_workers")},
        "train": train,
        "output_dir": str(spec["run_dir"]),
    }
    for dotted, value in (fields or {}).items():
        section, key = dotted.split(".", 1)
        recipe[section][key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def run_vlmtune(spec: dict) -> dict:
    """vlmtune's Python API, the probe attached to the trainer vlmtune.train builds; the vision-cache pre-pass
    (if this vlmtune has one) is timed and its tower calls counted."""
    import torch

    import vlmtune
    import vlmtune.training as vt

    os.environ["VLMTUNE_CACHE"] = spec["cache_dir"]  # fresh per run: the arm builds its own caches
    fields, skipped = arm_fields(spec)
    pre = {"seconds": 0.0, "cpu_seconds": 0.0, "vision_calls": 0}
    captured: dict = {}
    original_build = vt.build_trainer
    original_setup = getattr(vt, "vision_cache_setup", None)

    def build_trainer_with_probe(plan, *args, **kwargs):  # vlmtune.train takes no callbacks; attach ours here
        t0 = time.perf_counter()
        trainer, report = original_build(plan, *args, **kwargs)
        captured["build_trainer_seconds"] = time.perf_counter() - t0  # model load, pre-pass, checkpointing probe
        probe = make_probe(_pad_id(plan.processor.tokenizer), plan.family.vision_prefix, spec.get("profile_step"))
        probe.attach(trainer)
        captured.update(trainer=trainer, probe=probe)
        return trainer, report

    def timed_setup(model, *args, **kwargs):
        from .probes import base_model

        def count(*_):
            pre["vision_calls"] += 1

        handle = base_model(model).get_submodule(VISION_PREFIX).register_forward_hook(count)
        t0, cpu0 = time.perf_counter(), time.process_time()
        try:
            return original_setup(model, *args, **kwargs)
        finally:
            pre["seconds"], pre["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - cpu0
            handle.remove()

    vt.build_trainer = build_trainer_with_probe
    if original_setup is not None:
        vt.vision_cache_setup = timed_setup
    recipe_path = write_recipe(spec, Path(spec["run_dir"]).parent / "vlmtune-recipe.yaml", fields)
    recipe = vlmtune.load_recipe(recipe_path)
    t0 = time.perf_counter()
    result = vlmtune.train(recipe, overwrite=True)  # the arm's own scratch folder: a re-run replaces it
    total = time.perf_counter() - t0
    m = result.metrics
    cuda = torch.cuda.is_available()
    trainer = captured["trainer"]
    return {"probe": captured["probe"].summary(), "prepass": pre, "train_runtime": m.get("train_runtime"),
            "train_loss": m.get("train_loss"), "setup_seconds": total - (m.get("wall_seconds") or 0.0),
            "train_examples": m.get("train_examples"), "vlmtune_metrics": m, "recipe": str(recipe_path),
            "recipe_fields": fields, "skipped_fields": skipped,
            "build_trainer_seconds": captured.get("build_trainer_seconds"),
            **_memory(cuda),  # vlmtune.train resets the peak right before training
            "effective": effective(trainer)}


def run_arm(spec: dict) -> dict:
    return run_trl(spec) if spec["arm"] == "trl" else run_vlmtune(spec)
