"""A model ready to generate: a merged or plain model folder, or an adapter on its base, with the processor and
formatting it was trained with (vlmtune.json); and where a base model is found (predict and merge share it)."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import families
from ..adapter_files import ADAPTER_CONFIG, read_adapter_files
from ..data.conversation import TrainOn
from ..data.formatting import Formatter
from ..errors import VlmtuneError
from ..run_metadata import read_metadata

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def dtype_named(name: str | None) -> torch.dtype | None:
    """The torch dtype a --dtype value names (None stays None: each command's default)."""
    if name is None:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise VlmtuneError(f"--dtype must be bf16, fp16 or fp32, got {name!r}") from None


def local_base(ref: str) -> Path | None:
    """The base model's folder when it is on disk already (a builtin name or a folder), else None."""
    from ..modeling import resolve_model_path

    path = Path(resolve_model_path(ref)).expanduser()
    return path if path.is_dir() else None


def locate_base(ref: str) -> Path:
    """A local folder for a base model: builtin names, folders, or a Hugging Face id already in the cache."""
    if (path := local_base(ref)) is not None:
        return path
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise VlmtuneError(f"base model folder not found: {ref}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"]))
    except Exception as e:  # noqa: BLE001 - any hub failure means: not available here
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise VlmtuneError(f"cannot find the base model {ref!r} locally or on the hub ({first}); "
                           "give a local folder with --base") from None


def model_family(config, base_ref: str, meta: dict) -> families.Family:
    """The family the adapter was trained on (its vlmtune.json), else the base's; refused when they differ."""
    try:
        family = families.get(meta["family"]) if meta.get("family") else families.for_model_type(config.model_type)
    except families.UnknownFamilyError as e:
        raise VlmtuneError(str(e)) from None
    if config.model_type not in family.model_types:
        raise VlmtuneError(f"the base model {base_ref} is a {config.model_type} model but the adapter was trained "
                           f"on the {family.name} family; give the right base with --base")
    return family


@dataclass
class Loaded:
    """A model ready to generate, with the processor and formatting it was trained with."""

    model: object
    processor: object
    family: families.Family
    formatter: Formatter  # as in training (masking strategy and system prompt from vlmtune.json)
    kind: str  # "adapter" (base + adapter, unmerged) or "model"
    meta: dict = field(default_factory=dict)
    prompt_formatter: Formatter | None = None  # as `formatter`, supervising only the last reply (see encode)

    def __post_init__(self):
        if self.prompt_formatter is None:
            self.prompt_formatter = Formatter(self.family, self.processor, TrainOn.LAST_ASSISTANT,
                                              self.formatter.system_prompt)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_for_inference(path, base: str | None = None, dtype: torch.dtype | None = None,
                       device: str | None = None) -> Loaded:
    """A merged/plain model folder, or an adapter folder (detected by adapter_config.json) on its base."""
    from transformers import AutoConfig, AutoProcessor

    from ..modeling import resolve_model_path

    folder = Path(resolve_model_path(str(path))).expanduser()
    if not folder.is_dir():
        raise VlmtuneError(f"model or adapter folder not found: {path}")
    meta = read_metadata(folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    is_adapter = (folder / ADAPTER_CONFIG).is_file()
    if is_adapter:
        # the weights are checked (present, readable, finite) before any model is loaded
        adapter_config, _ = read_adapter_files(folder)
        base_ref = base or meta.get("base_model") or adapter_config.get("base_model_name_or_path")
        if not base_ref:
            raise VlmtuneError(f"{folder} names no base model; give it with --base")
        model_dir = locate_base(base_ref)
    elif not (folder / "config.json").is_file():
        raise VlmtuneError(f"{folder} is neither a model folder (config.json) nor an adapter folder "
                           f"({ADAPTER_CONFIG})")
    else:
        base_ref, model_dir = str(path), folder
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise VlmtuneError(f"cannot read the model config in {model_dir}: {e}") from None
    family = model_family(config, base_ref, meta)
    with quiet_loading():
        model = family.load_class().from_pretrained(model_dir, dtype=dtype)
        if is_adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, folder)
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(folder)
    formatter = Formatter(family, processor, meta.get("train_on", "assistant"), meta.get("system_prompt"))
    return Loaded(model, processor, family, formatter, "adapter" if is_adapter else "model", meta)


@contextlib.contextmanager
def quiet_loading():
    """No per-weight progress bars or deprecation chatter while models load (they drown the real output)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
