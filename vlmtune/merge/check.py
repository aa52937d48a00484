"""Parity check of a merged folder: its logits equal base + adapter (unmerged) and differ from the bare base.

Probe inputs are small conversations with an image each, formatted exactly as training formats them
(vlmtune's Formatter, the processor saved with the adapter, the family's image layout and positions).
All three models run in float32, one at a time. The error is max |merged - reference| / max |reference|
over every logit of every probe; the tolerance follows the merged weights' dtype.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..data.collator import collator_for
from ..data.conversation import Conversation, Part, Turn
from ..data.dataset import to_dataset
from ..data.images import image_size
from ..data.prepare import format_example  # training's formatting of one conversation
from ..errors import VlmtuneError
from ..inference.load import load_for_inference

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
_SUSPECT = {"merged": "merged folder", "base + adapter": "base model or the adapter", "bare base": "base model"}
_PROBES = [  # (image width, height), shapes left to right, question, answer
    ((56, 56), [("circle", "red")], "What colour is the circle?", "The circle is red."),
    ((84, 56), [("square", "blue"), ("triangle", "green")], "Which shape is on the right?",
     "The triangle is on the right."),
]


def parity_check(merged_dir: Path, base_dir: Path, adapter_dir: Path, meta: dict, weights_dtype: torch.dtype,
                 log=print) -> dict:
    """Compare logits on the probes; raise VlmtuneError when the merge is wrong or changed nothing."""
    with tempfile.TemporaryDirectory(prefix="vlmtune-probes-") as tmp:
        ref_model = load_for_inference(adapter_dir, base=str(base_dir), dtype=torch.float32)
        batches = probe_batches(ref_model, Path(tmp))
        reference = _logits(ref_model.model, batches)
        with ref_model.model.disable_adapter():
            bare = _logits(ref_model.model, batches)
        del ref_model
        merged_model = load_for_inference(merged_dir, dtype=torch.float32)
        merged = _logits(merged_model.model, batches)
        del merged_model
    for name, values in (("merged", merged), ("base + adapter", reference), ("bare base", bare)):
        bad = sum(int((~torch.isfinite(v)).sum()) for v in values)
        if bad:  # NaN compares as neither above nor below a tolerance: refuse it outright
            raise VlmtuneError(f"parity check failed: {bad} logits of the {name} model are NaN or infinite on the "
                               f"probe inputs; the {_SUSPECT[name]} holds non-finite weights")
    scale = max(r.abs().max().item() for r in reference)
    error = max((m - r).abs().max().item() for m, r in zip(merged, reference, strict=True)) / scale
    effect = max((r - b).abs().max().item() for r, b in zip(reference, bare, strict=True)) / scale
    moved = max((m - b).abs().max().item() for m, b in zip(merged, bare, strict=True)) / scale
    dtype = weights_dtype
    tol = TOLERANCE.get(dtype, 5e-2)
    result = {"probes": len(batches), "max_relative_error": error, "tolerance": tol,
              "merged_dtype": str(dtype).removeprefix("torch."), "adapter_effect": effect, "merged_vs_base": moved}
    quant = meta.get("quantization", "none")
    against = "base + adapter in float32" + (f" (full-precision base; training saw a {quant} base)"
                                             if quant != "none" else "")
    if effect == 0.0:
        raise VlmtuneError("the adapter does not change the base model's logits at all (are its LoRA B matrices "
                           "zero, i.e. untrained?); nothing to merge")
    if moved < 0.5 * effect:
        raise VlmtuneError(f"the merged model's logits are (nearly) those of the bare base (moved {moved:.2e} where "
                           f"the adapter moves them {effect:.2e}): the merge changed nothing it should have")
    if error > tol:
        raise VlmtuneError(f"parity check failed: the merged model's logits differ from {against} by {error:.2e} "
                           f"(relative), more than the tolerance {tol:.0e} for {result['merged_dtype']} weights")
    log(f"parity check: {len(batches)} probe inputs with an image; merged logits equal {against} within "
        f"{error:.1e} relative (tolerance {tol:.0e} for {result['merged_dtype']} weights); the adapter moves "
        f"them {effect:.1e} from the bare base")
    return result


def probe_batches(loaded, folder: Path) -> list[dict]:
    """One model-input batch per probe conversation (image + question + answer), built as in training."""
    from ..demo import draw_scene

    fmt, family, processor = loaded.formatter, loaded.family, loaded.processor
    tok = fmt.tokenizer
    collate = collator_for(family, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    examples = []
    for k, (size, objects, question, answer) in enumerate(_PROBES):
        path = folder / f"probe{k}.png"
        scene = [{"shape": shape, "colour": colour, "box": [4 + 26 * i, 14, 26 + 26 * i, 36]}
                 for i, (shape, colour) in enumerate(objects)]
        draw_scene(scene, 56).convert("RGB").resize(size).save(path)
        conv = Conversation([Turn("user", [Part(type="image", image=str(path)), Part(type="text", text=question)]),
                             Turn("assistant", [Part(type="text", text=answer)])], source=f"probe {k}")
        examples.append(format_example(conv, fmt, family, [image_size(path)], processor))
    dataset = to_dataset(examples, family, processor)
    batches = []
    for i in range(len(examples)):
        batch = collate([dataset[i]])
        batch.pop("labels")
        batches.append(batch)
    return batches


def _logits(model, batches: list[dict]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items()}
            out.append(model(**inputs).logits.float().cpu())
    return out

