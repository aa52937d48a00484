"""`train.liger_kernel`: Liger's Triton kernels (RMSNorm, SwiGLU / GeGLU, LayerNorm, RoPE) on the model instance.

Decided once while planning (`choose`): auto is on only on a CUDA GPU with liger-kernel installed, for a family whose
`Family.liger` names liger's patch and whose liger modules import with the installed transformers; `true` where one
of these fails is refused with the reason. Liger's fused linear cross-entropy is never asked: vlmtune's label-only
loss already never builds the full logits (label_loss.py), and Liger's would replace the model's forward that loss
runs through. Liger also rebinds the classes and functions of the family's transformers modules (process-wide), so
the patch is applied by distributed/process.py."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
from dataclasses import dataclass

from .config.schema import switch
from .errors import FieldError, VlmtuneError

# the kernel switches liger's apply functions take; every one not asked of a family is passed false
KERNELS = ("rms_norm", "swiglu", "layer_norm", "geglu", "rope", "cross_entropy", "fused_linear_cross_entropy")
FIELD = "train.liger_kernel"


@dataclass(frozen=True)
class LigerChoice:
    use: bool
    reason: str  # why on or off, one line
    problem: FieldError | None = None  # `true` where Liger cannot work


def choose(setting: object, family, device: str) -> LigerChoice:
    """On or off for this family on this device (`device`: "cuda" or "cpu"), and the refusal of a `true` that cannot
    work."""
    value = switch(setting)
    if value == "false":
        return LigerChoice(False, f"{FIELD}: false")
    why_not = unavailable(family, device)
    if not why_not:
        kernels = ", ".join(family.liger.kernels)
        return LigerChoice(True, f"{FIELD}: {value}; {family.liger.function} ({kernels})")
    if value == "true":
        return LigerChoice(False, why_not, FieldError(FIELD, f"cannot be true: {why_not}; set it to auto or false"))
    return LigerChoice(False, f"{FIELD}: auto, off: {why_not}")


def unavailable(family, device: str) -> str:
    """Why Liger cannot patch this family here ("" when it can)."""
    if device != "cuda":
        return "no CUDA GPU (Liger's kernels are Triton GPU kernels)"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    patch = family.liger
    if patch is None:
        return f"liger-kernel has no patch for the {family.name} family"
    try:
        function = _apply_function(patch)
        for module in patch.imports:
            importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 (an ImportError, or anything a liger release raises on import)
        return f"liger-kernel {_version()} cannot patch {family.name} with this transformers ({type(e).__name__}: {e})"
    if function is None:
        return f"liger-kernel {_version()} has no {patch.function}"
    return ""


def _apply_function(patch):
    module = importlib.import_module("liger_kernel.transformers")
    return getattr(module, patch.function, None)


def _version() -> str:
    try:
        return importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


def kernel_arguments(function, asked: tuple[str, ...]) -> dict[str, bool]:
    """The keyword switches for liger's apply function: the asked kernels true, every other kernel it takes false.
    A function taking **kwargs (LLaVA, InternVL, SmolVLM: it forwards them to its language model's patch) gets all."""
    params = inspect.signature(function).parameters
    forwards = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {name: name in asked for name in KERNELS if name in params or forwards}


def apply(model, family, required: bool) -> str:
    """Patch the loaded (not yet PEFT-wrapped) model with the family's Liger kernels; what was applied, in words.
    A failure is a VlmtuneError when `required` (train.liger_kernel: true), else returned as the reason it is off."""
    patch = family.liger
    try:
        function = _apply_function(patch)
        kwargs = kernel_arguments(function, patch.kernels)
        function(model=model, **kwargs)
    except Exception as e:  # noqa: BLE001 (liger raises ImportError, TypeError, AssertionError... by release)
        why = f"{patch.function} failed on this model ({type(e).__name__}: {e})"
        if required:
            raise VlmtuneError(f"{FIELD}: {why}; set it to auto or false") from e
        return f"Liger kernels: off ({why})"
    return f"Liger kernels: on ({', '.join(k for k, v in kwargs.items() if v)})"
