"""`predict`: generate for one prompt (with images) or every row of a data file, in batches of similar length,
with a merged model or base + adapter; the records are written to --out as they come (outputs.PredictionFile)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from ..errors import VlmtuneError
from .generation import encode, generate
from .load import Loaded, dtype_named, load_for_inference
from .outputs import PredictionFile
from .prompts import data_settings, read_prompts, single_prompt
from .retrieval import check_retrievable, open_index, question_of, retrieval_prompt, retrieve_all


def predict(model, images: list | None = None, prompt: str | None = None, data=None, out=None, *,
            base: str | None = None, image_root: str | None = None, max_new_tokens: int = 64,
            temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8, seed: int = 0,
            dtype: str | None = None, progress: bool = True, loaded: Loaded | None = None,
            data_format: str | None = None, retrieve=None, k: int | None = None,
            max_length: int | None = None) -> list[dict]:
    """Generate for one prompt (with images) or every row of a data file; write JSONL to `out` if given
    (checked before any work, and streamed to `<out>.partial` as each batch finishes; see PredictionFile).
    `retrieve`: an image index (folder or ImageIndex); its top `k` (default 4) images for the prompt's text become
    the prompt's images, or, with `data`, each row's top k for its last user turn's text start that turn (rows
    without images of their own); see retrieval (`max_length`: the token budget they must fit, default the VLM's
    data.max_length).

    Returns one record per input: {"row", "prediction", "reference", "source"}, and "retrieved" (path, score of
    each image given, best first) with `retrieve`.
    """
    from tqdm.auto import tqdm

    _validate(images, prompt, data, max_new_tokens, temperature, top_p, batch_size)
    if retrieve is not None and images:
        raise VlmtuneError("--retrieve finds the prompt's images itself: drop --image (or drop --retrieve to give "
                           "the images yourself)")
    if k is not None and retrieve is None:
        raise VlmtuneError("-k is the number of images --retrieve gives the prompt; give --retrieve INDEX with it")
    sink = PredictionFile(Path(out)) if out is not None else None  # refuses an unwritable --out before any work
    with _keep_partial(sink):
        if prompt is not None:
            prompts = [single_prompt(images, prompt)]
        else:
            fmt, options = data_settings(model, data_format)
            prompts = read_prompts(data, image_root, fmt, options)
        hits = None
        if retrieve is not None:  # the rows, the index and its model are checked before the VLM loads
            if prompt is None:
                check_retrievable(prompts)
            index = open_index(retrieve)
            hits = retrieve_all(index, [prompt] if prompt is not None else [question_of(p) for p in prompts],
                                4 if k is None else k)
        if loaded is None:
            loaded = load_for_inference(model, base=base, dtype=dtype_named(dtype))
        if hits is not None:
            prompts = [retrieval_prompt(loaded, prompt if prompt is not None else p, h, index.folder, max_length)
                       for p, h in zip(prompts, hits, strict=True)]
        torch.manual_seed(seed)
        encoded = [encode(loaded, p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i].input_ids))  # similar lengths together
        done: dict[int, dict] = {}
        with tqdm(total=len(prompts), desc="predicting", unit=" rows",
                  disable=not progress or len(prompts) == 1) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                texts = generate(loaded, [encoded[i] for i in idx], max_new_tokens, temperature, top_p)
                batch = [{"row": prompts[i].row, "prediction": text, "reference": prompts[i].reference,
                          "source": prompts[i].source,
                          **({} if hits is None else {"retrieved": [h.to_dict() for h in hits[i]]})}
                         for i, text in zip(idx, texts, strict=True)]
                done.update(zip(idx, batch, strict=True))
                if sink is not None:
                    sink.add(batch, len(prompts))
                bar.update(len(idx))
        records = [done[i] for i in range(len(prompts))]
        if sink is not None:
            sink.finish(records)
    return records


@contextlib.contextmanager
def _keep_partial(sink: PredictionFile | None):
    """On any failure (Ctrl-C included), say where the predictions made so far are."""
    try:
        yield
    except BaseException as e:
        note = sink.abandon() if sink is not None else ""
        if note and isinstance(e, VlmtuneError):
            raise VlmtuneError(f"{e}\n{note}") from None
        if note:
            print(note, file=sys.stderr)
        raise


def _validate(images, prompt, data, max_new_tokens, temperature, top_p, batch_size) -> None:
    if (prompt is None) == (data is None):
        raise VlmtuneError("give either a prompt (with --image files) or a data file (--data), not both or neither")
    if images and prompt is None:
        raise VlmtuneError("--image goes with --prompt; a data file names its images itself")
    if max_new_tokens <= 0 or batch_size <= 0:
        raise VlmtuneError("max_new_tokens and batch_size must be positive")
    if temperature < 0 or not 0 < top_p <= 1:
        raise VlmtuneError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")


def exact_matches(records: list[dict]) -> tuple[int, int]:
    """(predictions equal to their reference, rows with a reference)."""
    scored = [r for r in records if r["reference"] is not None]
    return sum(r["prediction"].strip() == r["reference"].strip() for r in scored), len(scored)
