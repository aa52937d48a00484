"""The recipe: schema, defaults, `key=value` overrides, and validation that reports every error at once."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data.conversation import TrainOn
from .data.formats import FIELDS, FORMATS
from .data.readers import llamafactory
from .errors import FieldError
from .recipe_distributed import distributed_errors
from .recipe_paths import PATH_FIELDS, paths_resolved  # noqa: F401 (PATH_FIELDS: part of this module's API)
from .recipe_ranges import BOUNDS, Bound  # noqa: F401 (Bound: part of this module's API)


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
    format: str = "messages"  # row layout: one of data.formats.FORMATS (data_templates/README.md)
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
    if source:
        raw = paths_resolved("", raw, Path(source).parent)
    raw = apply_overrides(raw, overrides or {}, errors)
    recipe = _build(Recipe, raw, "", errors)
    recipe.source = source
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
        value = paths_resolved(key, value, Path.cwd())  # a path typed on the command line: where it was typed
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
            errors.append(FieldError(path, f"unknown key; {_unknown_key_hint(str(key), prefix, list(fields))}"))
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


def _unknown_key_hint(key: str, prefix: str, known: list[str]) -> str:
    """Where the key belongs: the same name in another section, else a close spelling here, else anywhere."""
    elsewhere = [p for p in schema() if p.rpartition(".")[2] == key]
    if elsewhere:
        return f"did you mean {' or '.join(elsewhere)}?"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"did you mean {prefix}{close[0]}?"
    names = {p.rpartition(".")[2]: p for p in schema()}
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.75)
    return f"did you mean {names[close[0]]}?" if close else f"known keys: {', '.join(known)}"


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


@functools.lru_cache(maxsize=1)
def schema() -> dict[str, object]:
    """Every dotted path of the recipe, sections and fields, mapped to its type hint, in the order written."""
    out: dict[str, object] = {}

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("internal"):
                out[prefix + f.name] = hints[f.name]
                if dataclasses.is_dataclass(hints[f.name]):
                    walk(hints[f.name], f"{prefix}{f.name}.")

    walk(Recipe, "")
    return out


def numeric_fields() -> dict[str, type]:
    """Dotted path -> int or float, for every number field of the recipe (optional ones included)."""
    out = {}
    for path, hint in schema().items():
        kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if len(kinds) == 1 and kinds[0] in (int, float):
            out[path] = kinds[0]
    return out


def _number_errors(recipe: Recipe) -> list[FieldError]:
    """Each number field against its BOUNDS entry: finite and in range."""
    errs = []
    for path, kind in numeric_fields().items():
        section, _, key = path.rpartition(".")
        value = getattr(getattr(recipe, section) if section else recipe, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):  # a Recipe built in code, not from YAML
            errs.append(FieldError(path, f"must be {_describe(kind)}, got {_show(value)}"))
            continue
        problem = BOUNDS[path].problem(value, kind is int)
        if problem:
            errs.append(FieldError(path, problem))
    return errs


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
    errs.extend(_number_errors(recipe))

    m, lo, d, t = recipe.model, recipe.lora, recipe.data, recipe.train
    need(bool(m.name_or_path), "model.name_or_path", "is required: a Hugging Face model id, a local model folder, "
         "or a built-in tiny model (builtin:tiny-qwen2-vl)")
    from . import families

    need(m.family == "auto" or m.family in families.names(), "model.family",
         f"must be auto or one of {', '.join(families.names())}, got {_show(m.family)}")
    need(lo.target_modules is None or len(lo.target_modules) > 0, "lora.target_modules",
         "must name at least one module, or be left out for the family default")
    for prefix in ("", "video_"):  # image and per-frame video bounds
        lo_px, hi_px = getattr(d, f"{prefix}min_pixels"), getattr(d, f"{prefix}max_pixels")
        if lo_px and hi_px:
            need(lo_px <= hi_px, f"data.{prefix}min_pixels",
                 f"must not exceed data.{prefix}max_pixels ({lo_px} > {hi_px})")
    need(bool(d.train), "data.train", "is required: the path of the training data file (JSONL)")
    errs.extend(_columns_errors(d.columns, d.format))
    if check_paths:
        for key in ("train", "eval"):
            value = getattr(d, key)
            if value and llamafactory.reference(value) is not None:  # dir/dataset_info.json#name
                errs.extend(FieldError(f"data.{key}", p) for p in llamafactory.problems(value))
            elif value and not (Path(value).is_file() or Path(value).is_dir()):  # a folder: a datasets dataset
                need(False, f"data.{key}", f"file not found: {value}")
        if d.image_root and not Path(d.image_root).is_dir():
            need(False, "data.image_root", f"folder not found: {d.image_root}")
        errs.extend(FieldError(*p) for p in llamafactory.setting_problems([d.train, d.eval], d.format, d.columns))
    need(t.num_train_epochs != 0 or t.max_steps > 0, "train.num_train_epochs",  # other values: BOUNDS
         "must be positive (or set train.max_steps)")
    need(t.eval_steps is None or bool(d.eval), "train.eval_steps", "needs data.eval (an evaluation file)")
    need(bool(recipe.output_dir), "output_dir", "is required")
    errs.extend(distributed_errors(recipe, check_paths))
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
