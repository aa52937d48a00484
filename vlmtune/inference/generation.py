"""Prompts tokenized exactly as training tokenizes them, left-padded into batches, and the model's replies.

A prompt goes through training's own path: vlmtune's Formatter with the processor saved beside the model
(same chat template, system prompt and pixel bounds), the family's image layout, training's plan of each
video's frames, the dataset transform and the collator; the tokens before the final reply are the prompt,
ending in the template's generation prompt. Batches are left-padded; inputs only generate() needs come from the family, as transformers'
own processor would give them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.conversation import Conversation, Part, Turn
from ..data.formatting import IGNORE_INDEX
from ..data.images import image_size
from ..data.prepare import (
    Example,
    format_example,  # training's formatting of one conversation
    video_clips,  # training's planning of a conversation's videos
)
from ..errors import VlmtuneError
from .load import Loaded
from .prompts import Prompt


def encode(loaded: Loaded, prompt: Prompt) -> Example:
    """The prompt as training would tokenize it, ending in the generation prompt (an Example without labels).

    The conversation gets a placeholder reply and goes through training's own formatting (image token
    counts, grids, planned video clips, tokenization in runs between replies); the tokens before that reply
    are the prompt.
    """
    conv = Conversation([*prompt.turns, Turn("assistant", [Part(type="text", text="-")])], source=prompt.source,
                        tools=list(prompt.tools))
    try:  # an image (say, over the pixel limit) or a video is a problem of its row, as in training
        dims = [image_size(Path(p)) for p in conv.images]
        clips = video_clips(loaded.family, loaded.processor, conv.videos, {})
        example = format_example(conv, loaded.prompt_formatter, loaded.family, dims, loaded.processor, clips=clips)
    except ValueError as e:  # ImageProblem and VideoProblem included
        raise VlmtuneError(f"{prompt.source}: {e}") from None
    start = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    return Example(example.input_ids[:start], [IGNORE_INDEX] * start, example.images, example.grids, prompt.source,
                   videos=example.videos, media=example.media)


def model_inputs(loaded: Loaded, examples: list[Example]) -> dict:
    """One left-padded batch: training's dataset transform and collator, then padding moved to the left."""
    from ..data.collator import VisionCollator
    from ..data.dataset import to_dataset

    tok = loaded.formatter.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # the model's config: where video positions depend on it (Qwen2.5-VL's tokens_per_second)
    dataset = to_dataset(examples, loaded.family, loaded.processor, getattr(loaded.model, "config", None))
    fam = loaded.family
    batch = VisionCollator(pad, concat_keys=fam.concat_keys)([dataset[i] for i in range(len(examples))])
    batch.pop("labels")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    # training's positions where the family makes its own (they follow a video's seconds, which generate() cannot
    # derive from the token inputs); generate() continues them past the prompt
    positions = batch.get("position_ids")
    left_ids, left_mask = torch.full_like(ids, pad), torch.zeros_like(mask)
    left_positions = None if positions is None else torch.ones_like(positions)
    for i in range(len(examples)):
        n = int(mask[i].sum())
        left_ids[i, ids.shape[1] - n:] = ids[i, :n]
        left_mask[i, ids.shape[1] - n:] = 1
        if positions is not None:
            left_positions[:, i, ids.shape[1] - n:] = positions[:, i, :n]
    batch["input_ids"], batch["attention_mask"] = left_ids, left_mask
    if positions is not None:
        batch["position_ids"] = left_positions
    if fam.token_inputs is not None:  # per-token inputs, for the left-padded ids
        rows = [fam.token_inputs(loaded.processor, row) for row in left_ids.tolist()]
        for key in rows[0] if rows else ():
            batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
    return batch


def generate(loaded: Loaded, examples: list[Example], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0) -> list[str]:
    """Replies for one batch of encoded prompts."""
    tok = loaded.formatter.tokenizer
    batch = model_inputs(loaded, examples)
    device, dtype = loaded.device, loaded.model.dtype
    inputs = {k: v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}
    vocab = tok.get_vocab()
    stop = [vocab[t] for t in loaded.family.end_of_turn if t in vocab]
    eos = loaded.model.generation_config.eos_token_id
    stop += [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None and e not in stop]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sample = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=stop,
                                    **sample)
    length = inputs["input_ids"].shape[1]
    return [tok.decode(row[length:], skip_special_tokens=True).strip() for row in out]
