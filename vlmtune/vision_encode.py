"""Running a model's vision side once and recording what it returns, for the vision feature cache: the inner
model's `get_image_features` / `get_video_features` are wrapped to record their return value, and a pre-hook on
the language model stops the forward there, so nothing family-specific is called by name."""

from __future__ import annotations

from contextlib import contextmanager

import torch


def base_model(model):
    """The transformers model under a PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class _Stop(Exception):
    """Raised by the language model's pre-hook: the vision outputs are recorded, the rest is not needed."""


@contextmanager
def _recording(model, family):
    """Records what the inner model's get_image_features / get_video_features return; stops before the LM."""
    base = base_model(model)
    inner = base.get_submodule(family.language_prefix.rpartition(".")[0])
    records: dict[str, object] = {}
    patched = []
    inside: list[str] = []  # Qwen3-VL's get_video_features calls get_image_features: the outer call is what counts
    for kind, name in (("image", "get_image_features"), ("video", "get_video_features")):
        original = getattr(inner, name, None)
        if original is None:
            continue

        def recorded(*args, _original=original, _kind=kind, **kwargs):
            if inside:
                return _original(*args, **kwargs)
            inside.append(_kind)
            try:
                out = _original(*args, **kwargs)
            finally:
                inside.pop()
            records[_kind] = out
            return out

        setattr(inner, name, recorded)
        patched.append(name)

    def stop(*args, **kwargs):
        raise _Stop

    handle = base.get_submodule(family.language_prefix).register_forward_pre_hook(stop, with_kwargs=True)
    try:
        yield records
    finally:
        handle.remove()
        for name in patched:
            delattr(inner, name)


def encode(model, family, batch: dict, device) -> dict:
    """One collated example's cache entry: the recorded encoder outputs the model reads, and the processor
    outputs it still needs without pixels (grids, sizes)."""
    inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}
    with _recording(model, family) as records, torch.no_grad():
        try:
            base_model(model)(**inputs, use_cache=False)
        except _Stop:
            pass
    outputs = {}
    for kind, out in records.items():
        outputs[kind] = {n: getattr(out, n) for n in family.image_feature_outputs if getattr(out, n, None) is not None}
    kept = {k: batch[k] for k in family.concat_keys if k not in family.encoder_only_keys and k in batch}
    return {"outputs": outputs, "inputs": kept}
