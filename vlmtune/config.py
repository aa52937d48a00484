"""The recipe: schema, defaults, `key=value` overrides, and validation that reports every error at once."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data.conversation import TrainOn
from .data.formats import FIELDS, FORMATS


@dataclass
class ModelConfig:
    name_or_path: str = ""
    family: str = "auto"
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass
class QuantizationConfig:
    mode: str = "none"  # none | 4bit | 8bit
    quant_type: str = "nf4"  # nf4 | fp4
    double_quant: bool = True
    compute_dtype: str = "bfloat16"


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: the family's default (language model linear layers)
    train_vision_tower: bool = False
    train_projector: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    use_rslora: bool = False


@dataclass
class DataConfig:
    train: str = ""
    eval: str | None = None
    format: str = "messages"  # row layout: messages | llava | sharegpt | vqa | caption (data_templates/README.md)
    image_root: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # layout field -> column/key name in the data
    caption_prompt: str = "Describe this image."  # the user prompt of format: caption
    allow_urls: bool = False  # download http(s) image URLs into the cache
    max_length: int = 2048
    min_pixels: int | None = None
    max_pixels: int | None = None
    video_fps: float = 2.0  # frames sampled per second of video (a frame list is taken as sampled at this rate)
    video_max_frames: int = 32  # at most this many frames per video (the count is padded to an even number)
    video_min_pixels: int | None = None  # per-frame pixel bounds of videos; None: the processor's
    video_max_pixels: int | None = None
    train_on: str = "assistant"
    system_prompt: str | None = None
    on_overlong: str = "drop"  # drop | error | shrink_images
    num_workers: int | None = None  # DataLoader workers decoding images; None: chosen from the CPU count
    check_images: str = "auto"  # auto | decode | header: decode every image before training, or read headers only
    max_image_pixels: int = 178_956_970  # larger images (width x height) are refused: decompression-bomb guard
    max_bad_samples: int = 10  # samples that fail to load mid-run are skipped up to this many; 0: stop on the first
    max_row_bytes: int = 16 * 2**20  # a data row (a JSONL line, a JSON item) larger than this is refused unread


@dataclass
class TrainConfig:
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 1
    gradient_accumulation_steps: int = 8
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    gradient_checkpointing: bool = True
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    eval_steps: int | None = None
    seed: int = 42
    report_to: list[str] = field(default_factory=lambda: ["none"])
    use_cpu: bool = False
    resume_from_checkpoint: str | None = None  # "latest" (newest in output_dir/checkpoints) or a checkpoint folder
    group_by_length: bool = False  # batches of similar lengths: less padding, a little less randomness
    max_nonfinite_steps: int = 3  # stop (saving nothing non-finite) after this many steps with a NaN/inf loss or grad


@dataclass
class DistributedConfig:
    """Multi-process training on DeepSpeed ZeRO (README: Multi-GPU / multi-node)."""

    deepspeed: str = "none"  # none | zero2 | zero3 | zero3_offload | path to a DeepSpeed JSON config
    num_processes: int | None = None  # per node; None: every local GPU with deepspeed set, else 1
    num_nodes: int = 1
    node_rank: int | None = None  # None: $NODE_RANK, else 0
    master_addr: str | None = None  # None: $MASTER_ADDR, else 127.0.0.1 (single node)
    master_port: int | None = None  # None: $MASTER_PORT, else 29500
    hostfile: str | None = None  # DeepSpeed hostfile (`host slots=N` lines): the deepspeed launcher starts every node
    launcher: str = "auto"  # auto | torchrun | deepspeed | accelerate; auto: deepspeed with a hostfile, else torchrun


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output_dir: str = "runs/vlmtune"
    source: str | None = field(default=None, metadata={"internal": True})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d


CHOICES = {
    "model.dtype": ("auto", "bfloat16", "float16", "float32"),
    "model.attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "quantization.mode": ("none", "4bit", "8bit"),
    "quantization.quant_type": ("nf4", "fp4"),
    "quantization.compute_dtype": ("bfloat16", "float16", "float32"),
    "data.format": FORMATS,
    "data.train_on": tuple(t.value for t in TrainOn),
    "data.on_overlong": ("drop", "error", "shrink_images"),
    "data.check_images": ("auto", "decode", "header"),
    "train.lr_scheduler_type": ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
                                "polynomial", "inverse_sqrt"),
    "train.optim": ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
                    "adafactor", "sgd"),
    "distributed.launcher": ("auto", "torchrun", "deepspeed", "accelerate"),
}
ALIASES = {"model.dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16"},
           "quantization.compute_dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"},
           "quantization.mode": {"4-bit": "4bit", "qlora": "4bit", "8-bit": "8bit", None: "none", False: "none"},
           "distributed.deepspeed": {None: "none", False: "none", "zero-2": "zero2", "zero-3": "zero3",
                                     "zero3-offload": "zero3_offload", "zero-3-offload": "zero3_offload"}}


@dataclass(frozen=True)
class FieldError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class RecipeError(ValueError):
    """Every problem found in a recipe, each naming its field and the fix."""

    def __init__(self, errors: list[FieldError], source: str | None = None):
        self.errors = errors
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{len(errors)} problem{'s' if len(errors) != 1 else ''}{where}:\n{lines}")


def load_recipe(path: str | os.PathLike | None = None, overrides: dict | list[str] | None = None,
                check_paths: bool = True) -> Recipe:
    """Read a recipe YAML (or start from defaults), apply overrides, validate; raise RecipeError with all errors."""
    raw: dict = {}
    source = None
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError([FieldError("", f"recipe file not found: {path}")]) from None
        except IsADirectoryError:
            raise RecipeError([FieldError("", f"{path} is a folder; give the recipe's YAML file")]) from None
        except UnicodeDecodeError as e:
            raise RecipeError([FieldError("", f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8")]) from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise RecipeError([FieldError("", f"not valid YAML: {e}")], source) from None
        if not isinstance(raw, dict):
            raise RecipeError([FieldError("", "the recipe must be a mapping of sections (model, data, ...)")], source)
    errors: list[FieldError] = []
    raw = apply_overrides(raw, overrides or {}, errors)
    recipe = _build(Recipe, raw, "", errors)
    recipe.source = source
    if source:
        _resolve_relative_paths(recipe, Path(source).parent)
    errors.extend(validate(recipe, check_paths=check_paths))
    if errors:
        raise RecipeError(errors, source)
    return recipe


def apply_overrides(raw: dict, overrides: dict | list[str], errors: list[FieldError]) -> dict:
    """`["train.learning_rate=1e-4", ...]` or `{"train.learning_rate": 1e-4}` merged into the raw mapping."""
    raw = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else []
    if isinstance(overrides, list):
        parsed = []
        for item in overrides:
            if "=" not in item:
                errors.append(FieldError(item, "an override must look like section.key=value, e.g. train.max_steps=10"))
                continue
            key, value = item.split("=", 1)
            try:
                parsed.append((key.strip(), yaml.safe_load(value) if value.strip() else None))
            except yaml.YAMLError:
                errors.append(FieldError(key.strip(), f"the override value {value!r} is not valid YAML; quote it, "
                                         f"e.g. {key.strip()}='{value}'"))
        items = parsed
    for key, value in items:
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return raw


def _build(cls, raw: object, prefix: str, errors: list[FieldError]):
    """Instantiate a dataclass section from raw YAML, recording type errors and unknown keys."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(FieldError(prefix.rstrip("."), f"must be a mapping, got {_show(raw)}"))
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    values = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(fields)}"
            errors.append(FieldError(path, f"unknown key{hint}"))
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, path + ".", errors)
            continue
        value = ALIASES.get(path, {}).get(value, value) if _hashable(value) else value
        ok, converted = _convert(value, hint)
        if not ok:
            errors.append(FieldError(path, f"must be {_describe(hint)}, got {_show(value)}"))
            continue
        values[key] = converted
    return cls(**values)


def _convert(value, hint):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return True, None
        for arg in args:
            if arg is type(None):
                continue
            ok, v = _convert(value, arg)
            if ok:
                return True, v
        return False, None
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            return False, None
        out = []
        for item in value:
            ok, v = _convert(item, args[0])
            if not ok:
                return False, None
            out.append(v)
        return True, out
    if hint is bool:
        return (True, value) if isinstance(value, bool) else (False, None)
    if hint is int:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return False, None
    if hint is float:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)  # YAML reads 1e-4 as a string
            except ValueError:
                return False, None
        return False, None
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return True, str(value)
        return False, None
    return True, value


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is list:
        return f"a list of {_describe(args[0])}s"
    if args and origin is not list:
        return " or ".join(_describe(a) for a in args) + " or null"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _hashable(value) -> bool:
    try:
        hash(value)
        return True
    except TypeError:
        return False


def _resolve_relative_paths(recipe: Recipe, base: Path) -> None:
    """Data paths in a recipe file are relative to the recipe, unless they exist relative to the working dir."""
    data = recipe.data
    for name in ("train", "eval", "image_root"):
        value = getattr(data, name)
        if value and not Path(value).is_absolute() and not Path(value).exists() and (base / value).exists():
            setattr(data, name, os.path.normpath(base / value))
    dist = recipe.distributed
    for name in ("deepspeed", "hostfile"):  # a DeepSpeed JSON config or hostfile next to the recipe
        value = getattr(dist, name)
        if not value or (name == "deepspeed" and not value.endswith(".json")):
            continue
        if not Path(value).is_absolute() and not Path(value).exists() and (base / value).exists():
            setattr(dist, name, os.path.normpath(base / value))


def validate(recipe: Recipe, check_paths: bool = True) -> list[FieldError]:
    """Every value problem in a built recipe (types were checked while building)."""
    errs: list[FieldError] = []

    def need(cond: bool, path: str, message: str) -> None:
        if not cond:
            errs.append(FieldError(path, message))

    for path, choices in CHOICES.items():
        section, key = path.split(".")
        value = getattr(getattr(recipe, section), key)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            need(False, path, f"must be one of {', '.join(choices)}, got {_show(value)}{hint}")

    m, lo, d, t = recipe.model, recipe.lora, recipe.data, recipe.train
    need(bool(m.name_or_path), "model.name_or_path", "is required: a Hugging Face model id, a local model folder, "
         "or a built-in tiny model (builtin:tiny-qwen2-vl)")
    from . import families

    need(m.family == "auto" or m.family in families.names(), "model.family",
         f"must be auto or one of {', '.join(families.names())}, got {_show(m.family)}")
    need(lo.r > 0, "lora.r", f"must be a positive integer, got {lo.r}")
    need(lo.alpha > 0, "lora.alpha", f"must be a positive number, got {lo.alpha}")
    need(0.0 <= lo.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {lo.dropout}")
    need(lo.target_modules is None or len(lo.target_modules) > 0, "lora.target_modules",
         "must name at least one module, or be left out for the family default")
    need(d.max_length > 0, "data.max_length", f"must be a positive integer, got {d.max_length}")
    def pixel_bounds(prefix: str) -> None:  # image and per-frame video bounds follow the same rules
        lo_px, hi_px = getattr(d, f"{prefix}min_pixels"), getattr(d, f"{prefix}max_pixels")
        for key, v in ((f"{prefix}min_pixels", lo_px), (f"{prefix}max_pixels", hi_px)):
            need(v is None or v >= 28 * 28, f"data.{key}", f"must be at least 784 (one 28x28 patch), got {v}")
        if lo_px and hi_px:
            need(lo_px <= hi_px, f"data.{prefix}min_pixels",
                 f"must not exceed data.{prefix}max_pixels ({lo_px} > {hi_px})")

    pixel_bounds("")
    need(d.video_fps > 0, "data.video_fps", f"must be a positive number of frames per second, got {d.video_fps}")
    need(d.video_max_frames >= 2, "data.video_max_frames",
         f"must be at least 2 (frames are grouped in pairs), got {d.video_max_frames}")
    pixel_bounds("video_")
    need(d.num_workers is None or d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    need(bool(d.train), "data.train", "is required: the path of the training data file (JSONL)")
    errs.extend(_columns_errors(d.columns, d.format))
    if check_paths:
        for key in ("train", "eval"):
            value = getattr(d, key)
            if value and not (Path(value).is_file() or Path(value).is_dir()):  # a folder: a datasets dataset
                need(False, f"data.{key}", f"file not found: {value}")
        if d.image_root and not Path(d.image_root).is_dir():
            need(False, "data.image_root", f"folder not found: {d.image_root}")
    need(t.num_train_epochs > 0 or t.max_steps > 0, "train.num_train_epochs",
         "must be positive (or set train.max_steps)")
    need(t.max_steps == -1 or t.max_steps > 0, "train.max_steps", f"must be -1 (use epochs) or positive, got {t.max_steps}")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps", "save_steps"):
        v = getattr(t, key)
        need(v > 0, f"train.{key}", f"must be a positive integer, got {v}")
    need(t.learning_rate > 0, "train.learning_rate", f"must be positive, got {t.learning_rate}")
    need(0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}")
    need(t.eval_steps is None or t.eval_steps > 0, "train.eval_steps", f"must be positive, got {t.eval_steps}")
    need(t.eval_steps is None or bool(d.eval), "train.eval_steps", "needs data.eval (an evaluation file)")
    need(bool(recipe.output_dir), "output_dir", "is required")
    errs.extend(_distributed_errors(recipe, check_paths))
    return errs


def _distributed_errors(recipe: Recipe, check_paths: bool) -> list[FieldError]:
    """The distributed section, and the combinations with quantization that DeepSpeed cannot run."""
    from . import deepspeed_config

    errs: list[FieldError] = []
    dist, q = recipe.distributed, recipe.quantization
    ds = dist.deepspeed
    presets = ", ".join(deepspeed_config.PRESET_NAMES)
    config = None
    if deepspeed_config.is_preset(ds):
        config = deepspeed_config.load(ds)
    elif ds != "none":
        if not ds.endswith(".json"):
            close = difflib.get_close_matches(ds, deepspeed_config.PRESET_NAMES, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            errs.append(FieldError("distributed.deepspeed", f"must be none, {presets} or the path of a DeepSpeed "
                                   f"JSON config, got {_show(ds)}{hint}"))
        elif check_paths:
            try:
                config = deepspeed_config.load(ds)
            except deepspeed_config.DeepSpeedConfigError as e:
                errs.append(FieldError("distributed.deepspeed", str(e)))
    if dist.num_processes is not None and dist.num_processes < 1:
        errs.append(FieldError("distributed.num_processes", f"must be a positive integer, got {dist.num_processes}"))
    if dist.num_nodes < 1:
        errs.append(FieldError("distributed.num_nodes", f"must be a positive integer, got {dist.num_nodes}"))
    if dist.node_rank is not None and not 0 <= dist.node_rank < max(dist.num_nodes, 1):
        errs.append(FieldError("distributed.node_rank", f"must be in [0, num_nodes={dist.num_nodes}), got {dist.node_rank}"))
    if dist.master_port is not None and not 1 <= dist.master_port <= 65535:
        errs.append(FieldError("distributed.master_port", f"must be a TCP port (1-65535), got {dist.master_port}"))
    if dist.hostfile:
        if check_paths and not Path(dist.hostfile).expanduser().is_file():
            errs.append(FieldError("distributed.hostfile", f"file not found: {dist.hostfile}"))
        if dist.launcher in ("torchrun", "accelerate"):
            errs.append(FieldError("distributed.hostfile", f"is read by the deepspeed launcher, not {dist.launcher}; "
                                   "set distributed.launcher=deepspeed (or auto), or give num_nodes, node_rank and "
                                   "master_addr and start vlmtune on every node"))
        if dist.node_rank is not None:
            errs.append(FieldError("distributed.node_rank", "is not used with a hostfile: the deepspeed launcher "
                                   "starts every node of the hostfile itself; remove one of them"))
        if ds == "none":
            errs.append(FieldError("distributed.hostfile", "needs distributed.deepspeed (zero2, zero3, ...): "
                                   "the hostfile is read by the deepspeed launcher"))
    if dist.launcher == "deepspeed" and ds == "none":
        errs.append(FieldError("distributed.launcher", "deepspeed needs distributed.deepspeed set (zero2, zero3, ...); "
                               "plain data parallel runs under torchrun"))
    if config is not None:
        stage = deepspeed_config.zero_stage(config)
        offload = deepspeed_config.offloads(config)
        if stage == 3 and q.mode == "8bit":
            errs.append(FieldError("quantization.mode", "8-bit (LLM.int8) weights cannot be partitioned by ZeRO-3; "
                                   "use quantization.mode=4bit (QLoRA) or distributed.deepspeed=zero2"))
        if q.mode == "4bit" and offload["param"]:
            errs.append(FieldError("distributed.deepspeed", "4-bit (QLoRA) with ZeRO-3 parameter offload is not "
                                   "supported (bitsandbytes' packed 4-bit weights and their quantization state are "
                                   "not made to be paged to the CPU and back); use zero3 without offload_param, "
                                   "or quantization.mode=none with zero3_offload"))
    return errs


def _columns_errors(columns: object, fmt: str) -> list[FieldError]:
    """data.columns: a mapping from the format's field names to column names."""
    if columns is None:
        return []
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        return [FieldError("data.columns", f"must map field names to column names, e.g. {{image: img}}, got {columns!r}")]
    known = FIELDS.get(fmt, ())
    return [FieldError(f"data.columns.{key}", f"is not a field of format {fmt}; its fields: {', '.join(known)}")
            for key in columns if fmt in FIELDS and key not in known]


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
