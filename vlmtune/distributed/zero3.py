"""ZeRO-3's two traps, handled.

- ZeRO-3 partitions every weight and gathers it, collectively, when its module runs: every rank must run the
  vision tower the same number of times. A batch without images runs it on a tiny dummy image from the model's
  own image processor (`Family.dummy_vision_inputs`), whose output is added to the loss times zero.
- ZeRO-3 leaves each rank holding a slice of every weight: the adapter is gathered before it is saved.
"""

from __future__ import annotations

import inspect

import torch

from ..errors import VlmtuneError


# ------------------------------------------------------------------ ZeRO-3: the vision tower in step
def dummy_vision_inputs(family, processor) -> dict[str, torch.Tensor]:
    """Vision inputs for one small blank image, as the family makes them (`Family.dummy_vision_inputs`)."""
    return dict(family.dummy_vision_inputs(family, processor))


def _float_sum(obj) -> torch.Tensor | None:
    """Sum of every floating-point tensor in a model output (tensor, tuple/list, mapping or ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        return obj.float().sum() if obj.is_floating_point() else None
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        total = None
        for item in obj:
            s = _float_sum(item)
            if s is not None:
                total = s if total is None else total + s
        return total
    return None


class VisionInStep:
    """Keeps every rank's vision tower calls in step under ZeRO-3.

    The model embeds the tokens, runs the vision tower when the batch has images, then the language model.
    ZeRO-3 gathers each module's weights collectively as the module runs, so ranks must run the same
    modules in the same order. On a batch without images, a hook right before the language model runs
    the vision tower on a dummy image and adds its output, times zero, to the input embeddings: the same
    order of gathers forward, and the same backward path (zero gradients for a trained tower/projector).
    """

    def __init__(self, model, family, processor):
        self.model = model
        self.family = family
        params = inspect.signature(model.get_image_features).parameters
        self.inputs = {k: v for k, v in dummy_vision_inputs(family, processor).items() if k in params}
        if "pixel_values" not in self.inputs:
            raise VlmtuneError("cannot build a dummy image input for this model: its image processor made no "
                               "pixel_values")
        try:
            language = model.get_submodule(family.language_prefix)
        except AttributeError:
            raise VlmtuneError(f"the model has no {family.language_prefix} module (family {family.name})") from None
        self.calls = 0  # forwards that ran the dummy image (for tests and logs)
        self._has_images: bool | None = None
        self.handles = [model.register_forward_pre_hook(self._on_model, with_kwargs=True),
                        language.register_forward_pre_hook(self._on_language_model, with_kwargs=True),
                        model.register_forward_hook(self._done)]

    def _dtype(self) -> torch.dtype:
        try:
            tower = self.model.get_submodule(self.family.vision_prefix)
            return next(p.dtype for p in tower.parameters() if p.is_floating_point())
        except (AttributeError, StopIteration):
            return torch.float32

    def _on_model(self, module, args, kwargs):
        self._has_images = any(kwargs.get(k) is not None for k in ("pixel_values", *self.family.concat_keys))
        return None

    def _on_language_model(self, module, args, kwargs):
        has_images, self._has_images = self._has_images, None  # once per model forward
        if has_images is not False:
            return None
        embeds = kwargs.get("inputs_embeds")
        if not isinstance(embeds, torch.Tensor):
            raise VlmtuneError("the language model was called without inputs_embeds; the dummy image forward "
                               "that keeps ZeRO-3 ranks in step has nowhere to go")
        dtype = self._dtype()
        inputs = {k: v.to(device=embeds.device, dtype=dtype if v.is_floating_point() else v.dtype)
                  for k, v in self.inputs.items()}
        out = self.model.get_image_features(**inputs, return_dict=True)
        # exactly what the model itself feeds on (`Family.image_feature_outputs`): a missing one leaves its
        # weights without a gradient on this rank, an extra one adds a backward pass an image batch does not have
        features = [f for f in (getattr(out, k, None) for k in self.family.image_feature_outputs) if f is not None]
        total = _float_sum(features if features else out)
        self.calls += 1
        if total is not None:
            kwargs["inputs_embeds"] = embeds + (total * 0.0).to(embeds.dtype)
        return args, kwargs

    def _done(self, module, args, output):
        self._has_images = None
        return None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def keep_vision_in_step(model, family, processor) -> VisionInStep:
    """Install VisionInStep on the HF model inside a (PEFT-wrapped) model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return VisionInStep(base, family, processor)


# ------------------------------------------------------------------ ZeRO-3: saving the adapter
def is_partitioned(param) -> bool:
    return hasattr(param, "ds_id")


def gathered_adapter_state(model) -> dict[str, torch.Tensor] | None:
    """The adapter's full weights (state-dict names) gathered from every ZeRO-3 rank, or None if not partitioned.

    Collective under ZeRO-3: every rank must call it.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or "lora_" in n]
    if not any(is_partitioned(p) for _, p in named):
        return None
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for _, p in named if is_partitioned(p)], modifier_rank=None):
        state = {n: p.detach().clone().cpu() for n, p in named}
    empty = [n for n, t in state.items() if t.numel() == 0]
    if empty:
        raise VlmtuneError(f"gathering the adapter under ZeRO-3 left {len(empty)} empty tensors (e.g. {empty[0]})")
    return state
