"""DeepSpeed configs: the shipped presets, `auto` values filled from the recipe, validation by DeepSpeed itself.

`auto` values are filled the way the Hugging Face integration documents them
(transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig):

| DeepSpeed key                                   | value                                                    |
|-------------------------------------------------|----------------------------------------------------------|
| train_micro_batch_size_per_gpu                  | train.per_device_train_batch_size                        |
| gradient_accumulation_steps                     | train.gradient_accumulation_steps                        |
| train_batch_size                                | world size x micro batch x gradient accumulation         |
| gradient_clipping                               | train.max_grad_norm                                      |
| bf16.enabled / fp16.enabled                     | the run's precision (bf16 / fp16 on a GPU, else both off) |
| optimizer.params.lr / weight_decay              | train.learning_rate / train.weight_decay                 |
| optimizer.params.betas / eps                    | [0.9, 0.999] / 1e-8 (the Trainer's defaults)             |
| scheduler.params.warmup_min_lr / warmup_max_lr  | 0 / train.learning_rate                                  |
| scheduler.params.total_num_steps / warmup_num_steps | left to the Trainer, which knows the step count      |
| zero_optimization.reduce_bucket_size            | hidden_size^2                                            |
| zero_optimization.stage3_prefetch_bucket_size   | 0.9 x hidden_size^2 (ZeRO-3)                             |
| zero_optimization.stage3_param_persistence_threshold | 10 x hidden_size (ZeRO-3)                           |

The presets carry no `optimizer` or `scheduler` block: the Trainer builds the recipe's own (`train.optim`,
`train.lr_scheduler_type`), and DeepSpeed wraps it. With optimizer offload that client optimizer runs on
the CPU copies of the (LoRA-sized) trainable weights, which `zero_force_ds_cpu_optimizer: false` allows.

`for_run` is the one place a run's config is filled and validated (recipe validation only reads it, for its
stage and offloads); the run's plan holds the result.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..errors import FieldError

AUTO = "auto"

_PRECISION = {
    "bf16": {"enabled": AUTO},
    "fp16": {"enabled": AUTO, "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
}
_BATCH = {
    "train_batch_size": AUTO,
    "train_micro_batch_size_per_gpu": AUTO,
    "gradient_accumulation_steps": AUTO,
    "gradient_clipping": AUTO,
    "steps_per_print": 1000000,  # the Trainer logs; DeepSpeed's own step lines only repeat it
    "wall_clock_breakdown": False,
}
_ZERO3 = {
    "stage": 3,
    "overlap_comm": True,
    "contiguous_gradients": True,
    "sub_group_size": 1_000_000_000,
    "reduce_bucket_size": AUTO,
    "stage3_prefetch_bucket_size": AUTO,
    "stage3_param_persistence_threshold": AUTO,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    # without it a ZeRO-3 checkpoint's model file holds empty tensors
    "stage3_gather_16bit_weights_on_model_save": True,
}

PRESETS: dict[str, dict] = {
    "zero2": {
        **copy.deepcopy(_PRECISION),
        "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 200_000_000,
                              "overlap_comm": True, "reduce_scatter": True, "reduce_bucket_size": AUTO,
                              "contiguous_gradients": True},
        **_BATCH,
    },
    "zero3": {
        **copy.deepcopy(_PRECISION),
        "zero_optimization": copy.deepcopy(_ZERO3),
        **_BATCH,
    },
    "zero3_offload": {
        **copy.deepcopy(_PRECISION),
        "zero_optimization": {**copy.deepcopy(_ZERO3),
                              "offload_optimizer": {"device": "cpu", "pin_memory": True},
                              "offload_param": {"device": "cpu", "pin_memory": True}},
        "zero_force_ds_cpu_optimizer": False,
        **_BATCH,
    },
}
PRESET_NAMES = tuple(PRESETS)
# Keys the Trainer fills once it knows the number of training steps.
TRAINER_FILLED = ("scheduler.params.total_num_steps", "scheduler.params.warmup_num_steps")


class DeepSpeedConfigError(ValueError):
    pass


def is_preset(spec: str) -> bool:
    return spec in PRESETS


def load(spec: str) -> dict:
    """A preset name or the path of a DeepSpeed JSON config -> the config (a fresh copy, autos unfilled)."""
    if spec in PRESETS:
        return copy.deepcopy(PRESETS[spec])
    path = Path(spec).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DeepSpeedConfigError(f"DeepSpeed config file not found: {spec} (or use one of "
                                   f"{', '.join(PRESET_NAMES)})") from None
    except OSError as e:
        raise DeepSpeedConfigError(f"cannot read the DeepSpeed config {spec}: {e}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"{spec} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"{spec} must hold a JSON object (a DeepSpeed config), got {type(config).__name__}")
    return config


def zero_stage(config: dict) -> int:
    zero = config.get("zero_optimization") or {}
    try:
        return int(zero.get("stage", 0))
    except (TypeError, ValueError):
        return 0


def offloads(config: dict) -> dict[str, bool]:
    """Which of optimizer state / parameters the config offloads to the CPU or NVMe."""
    zero = config.get("zero_optimization") or {}

    def on(key: str) -> bool:
        device = (zero.get(key) or {}).get("device", "none")
        return device not in (None, "none")

    return {"optimizer": on("offload_optimizer"), "param": on("offload_param") and zero_stage(config) == 3}


def auto_values(*, world_size: int, micro_batch: int, grad_accum: int, max_grad_norm: float, bf16: bool,
                fp16: bool, learning_rate: float, weight_decay: float, hidden_size: int | None = None,
                adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                num_training_steps: int | None = None, warmup_steps: int | None = None) -> dict:
    """The value of every `auto` key (dotted DeepSpeed path) for these training arguments."""
    values = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": world_size * micro_batch * grad_accum,
        "gradient_clipping": max_grad_norm,
        "bf16.enabled": bool(bf16),
        "fp16.enabled": bool(fp16),
        "optimizer.params.lr": learning_rate,
        "optimizer.params.betas": list(adam_betas),
        "optimizer.params.eps": adam_eps,
        "optimizer.params.weight_decay": weight_decay,
        "scheduler.params.warmup_min_lr": 0,
        "scheduler.params.warmup_max_lr": learning_rate,
    }
    if hidden_size:
        values["zero_optimization.reduce_bucket_size"] = hidden_size * hidden_size
        values["zero_optimization.stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
        values["zero_optimization.stage3_param_persistence_threshold"] = 10 * hidden_size
    if num_training_steps is not None:
        values["scheduler.params.total_num_steps"] = num_training_steps
        values["scheduler.params.warmup_num_steps"] = max(1, warmup_steps or 0)
    return values


def fill_autos(config: dict, values: dict) -> dict:
    """A copy of config with each `auto` whose dotted path is in values replaced; other values untouched."""
    out = copy.deepcopy(config)
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict) and node.get(leaf) == AUTO:
            node[leaf] = value
    return out


def remaining_autos(config: dict, prefix: str = "") -> list[str]:
    """Dotted paths still set to `auto`."""
    found = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if value == AUTO:
            found.append(path)
        elif isinstance(value, dict):
            found.extend(remaining_autos(value, path + "."))
    return found


def mismatches(config: dict, values: dict) -> list[str]:
    """Keys the config sets explicitly to a value other than the recipe's (the Trainer refuses those)."""
    checked = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
               "gradient_clipping", "bf16.enabled", "fp16.enabled")
    out = []
    for dotted in checked:
        node = config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None or node == AUTO:
            continue
        want = values[dotted]
        if dotted.endswith("enabled") and not want and not node:
            continue
        if node != want:
            out.append(f"{dotted} is {node!r} in the DeepSpeed config but {want!r} from the recipe; "
                       "set it to \"auto\" (or change the recipe)")
    return out


def validate(config: dict, world_size: int = 1, allow_trainer_filled: bool = True) -> list[str]:
    """Problems DeepSpeed's own config class (deepspeed.runtime.config.DeepSpeedConfig) finds in a filled config.

    DeepSpeed reads the world size from the process group; outside one the class is told it, so that the
    batch-size identity train_batch_size = micro batch x accumulation x world size is checked for real.
    """
    left = [k for k in remaining_autos(config) if not (allow_trainer_filled and k in TRAINER_FILLED)]
    if left:
        return [f"`auto` left unfilled: {', '.join(left)}"]
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError as e:
        return [f"deepspeed is not installed ({e}): pip install 'vlmtune[gpu]' (DS_BUILD_OPS=0 builds it in seconds)"]

    class _AtWorldSize(DeepSpeedConfig):
        def _configure_train_batch_size(self):
            self.world_size = world_size
            super()._configure_train_batch_size()

    checked = copy.deepcopy(config)
    for dotted in TRAINER_FILLED:  # a placeholder where only the Trainer knows the value
        *parents, leaf = dotted.split(".")
        node = checked
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and node.get(leaf) == AUTO:
            node[leaf] = 1
    try:
        _AtWorldSize(checked)
    except Exception as e:  # DeepSpeed raises AssertionError, ValueError and pydantic's ValidationError
        text = str(e).strip() or e.__class__.__name__
        return [f"DeepSpeed rejects the config: {text}"]
    return []


def hidden_size_of(model_config) -> int | None:
    """The language model's hidden size (what the HF integration sizes its buckets from)."""
    for cfg in (getattr(model_config, "text_config", None), model_config):
        size = getattr(cfg, "hidden_size", None) if cfg is not None else None
        if isinstance(size, int) and size > 0:
            return size
    return None


def for_run(recipe, runtime, model_config, world_size: int) -> tuple[dict | None, list[FieldError]]:
    """The run's DeepSpeed config, read, filled and validated once (None without DeepSpeed), and everything the
    recipe's DeepSpeed set-up cannot do with this model on this machine (`recipe`: a config.Recipe;
    `runtime`: the modeling.Runtime the run will use; `world_size`: how many processes it will have)."""
    d, q, t = recipe.distributed, recipe.quantization, recipe.train
    if d.deepspeed == "none":
        return None, []
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        return None, [FieldError("distributed.deepspeed", f"needs the deepspeed package, which cannot be imported "
                                 f"({e}): DS_BUILD_OPS=0 pip install 'vlmtune[gpu]'")]
    try:
        raw = load(d.deepspeed)
    except DeepSpeedConfigError as e:
        return None, [FieldError("distributed.deepspeed", str(e))]
    errs: list[FieldError] = []
    stage = zero_stage(raw)
    pre_quantized = getattr(model_config, "quantization_config", None)
    if pre_quantized is not None and stage == 3:
        method = pre_quantized.get("quant_method", "?") if isinstance(pre_quantized, dict) else \
            getattr(pre_quantized, "quant_method", "?")
        errs.append(FieldError("distributed.deepspeed", f"{recipe.model.name_or_path} is a pre-quantized checkpoint "
                               f"({method}); ZeRO-3 cannot partition its packed weights: use zero2, or the "
                               "full-precision checkpoint with quantization.mode=4bit"))
    if q.mode == "4bit" and stage == 3 and getattr(torch, q.compute_dtype) != runtime.dtype:
        errs.append(FieldError("quantization.compute_dtype", f"must equal the model dtype "
                               f"({str(runtime.dtype).removeprefix('torch.')}) under ZeRO-3: the 4-bit weights are "
                               "stored in the compute dtype (bnb_4bit_quant_storage) so that DeepSpeed can "
                               "partition them with every other weight"))
    gpu = runtime.device == "cuda"
    values = auto_values(
        world_size=world_size, micro_batch=t.per_device_train_batch_size, grad_accum=t.gradient_accumulation_steps,
        max_grad_norm=t.max_grad_norm, bf16=runtime.dtype == torch.bfloat16 and gpu,
        fp16=runtime.dtype == torch.float16 and gpu, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
        hidden_size=hidden_size_of(model_config))
    config = fill_autos(raw, values)
    problems = mismatches(raw, values) + validate(config, world_size=world_size)
    errs.extend(FieldError("distributed.deepspeed", p) for p in problems)
    return config, errs
