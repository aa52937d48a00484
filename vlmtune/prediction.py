"""`predict`: generate with a merged model or a base + adapter (unmerged), prompts formatted as in training.

A prompt goes through training's own path: vlmtune's Formatter with the processor saved beside the model
(same chat template, system prompt and pixel bounds), the family's image layout, the dataset transform
and the collator; the tokens before the final reply are the prompt, ending in the template's generation
prompt. Batches are left-padded; inputs only generate() needs come from the family, as transformers'
own processor would give them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import families
from .data.conversation import Conversation, Part, TrainOn, Turn
from .data.formatting import IGNORE_INDEX, Formatter
from .data.images import ImageProblem, image_size
from .data.prepare import (
    Example,
    format_example,  # training's formatting of one conversation
)
from .errors import VlmtuneError
from .merge_folder import DTYPES, locate_base, model_family
from .merge_lora import ADAPTER_CONFIG, read_adapter_files
from .run_metadata import read_metadata


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

    from .modeling import resolve_model_path

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


@dataclass
class Prompt:
    """One generation request: the conversation so far, its images, and the reference reply if known."""

    turns: list[Turn]
    row: dict
    reference: str | None = None
    source: str = ""
    tools: list = field(default_factory=list)  # tool definitions for the chat template, as in training

    @property
    def images(self) -> list[str]:
        return [img for t in self.turns for img in t.images]


def single_prompt(images: list, text: str) -> Prompt:
    paths = [str(Path(p)) for p in images or []]
    for p in paths:
        try:
            image_size(Path(p))
        except ImageProblem as e:
            raise VlmtuneError(str(e)) from None
    parts = [Part(type="image", image=p) for p in paths] + [Part(type="text", text=text)]
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": p} for p in paths]
                         + [{"type": "text", "text": text}]}]}
    return Prompt([Turn("user", parts)], row, None, "prompt")


def read_prompts(path, image_root: str | None = None, fmt: str = "messages",
                 options: dict | None = None) -> list[Prompt]:
    """Rows of a data file: the conversation before a final assistant reply, which is the reference answer.
    In `messages` rows that end in a user turn are prompts without a reference; other formats (llava,
    sharegpt, vqa, caption; `options` as `formats.reader_options`) are read exactly as training reads them."""
    from .data.images import ImageResolver
    from .data.readers import llamafactory, sources
    from .data.readers.common import RowError

    if llamafactory.reference(path) is not None:  # dir/dataset_info.json#name: read as training reads it
        return _prompts_from_format(Path(path), image_root, fmt, options or {})
    path = Path(path)
    if not path.exists():
        raise VlmtuneError(f"data file not found: {path}")
    if fmt != "messages":
        return _prompts_from_format(path, image_root, fmt, options or {})
    resolve = ImageResolver(sources.base_dir(path), image_root)
    prompts, problems = [], []
    for number, unit, raw in sources.rows(path, {}):
        source = f"{path}:{number}"
        try:
            if isinstance(raw, RowError):
                raise raw
            prompts.append(_prompt_from_row(raw, resolve, source))
        except (RowError, ImageProblem) as e:
            problems.append(f"{source}: {(unit + ' ') if unit else ''}{e}")
    return _usable(path, prompts, problems)


def _prompts_from_format(path: Path, image_root: str | None, fmt: str, options: dict) -> list[Prompt]:
    from .data.formats import RowProblem, read_rows
    from .data.formatting import template_messages

    prompts, problems = [], []
    try:
        rows = list(read_rows(path, fmt, image_root, **options))
    except ValueError as e:
        raise VlmtuneError(str(e)) from None
    for item in rows:
        if isinstance(item, RowProblem):
            problems.append(str(item))
            continue
        *turns, last = item.turns
        try:  # before the model loads, as for messages rows
            _check_images(turns)
        except ImageProblem as e:
            problems.append(f"{item.source}: {e}")
            continue
        row = {"messages": [{**m, "images": t.images} for m, t in zip(template_messages(item.turns), item.turns,
                                                                        strict=True)]}
        prompts.append(Prompt(turns, row, last.text, item.source, list(item.tools)))
    return _usable(path, prompts, problems)


def _usable(path, prompts: list[Prompt], problems: list[str]) -> list[Prompt]:
    """The prompts of a data file, or one error listing every row that cannot be used."""
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise VlmtuneError(f"{len(problems)} row(s) of {path} cannot be used:\n{shown}{more}")
    if not prompts:
        raise VlmtuneError(f"{path} has no rows")
    return prompts


def _check_images(turns: list[Turn]) -> None:
    """ImageProblem for the first image of the prompt that is missing, unreadable or too large."""
    for img in (i for t in turns for i in t.images):
        image_size(Path(img))


def _data_settings(model, data_format: str | None) -> tuple[str, dict]:
    """The data format and reader options: given, else as the adapter or merged model was trained."""
    data = read_metadata(Path(str(model))).get("data") or {}
    options = {"columns": data.get("columns") or {}}
    if data.get("caption_prompt"):
        options["caption_prompt"] = data["caption_prompt"]
    return data_format or data.get("format") or "messages", options


def _prompt_from_row(row, resolve, source: str) -> Prompt:
    from .data.readers import messages as reader
    from .data.readers.common import Options

    messages = row.get("messages") if isinstance(row, dict) else None
    has_reply = bool(messages) and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant"
    parsed_row = row
    if isinstance(messages, list) and not has_reply:
        # the reader wants an assistant reply: a prompt-only row gets a placeholder, dropped again below
        parsed_row = {**row, "messages": [*messages, {"role": "assistant", "content": "-"}]}
    *turns, last = reader.read(parsed_row, resolve, Options()).turns
    _check_images(turns)
    return Prompt(turns, row, last.text if has_reply else None, source)


def encode(loaded: Loaded, prompt: Prompt) -> Example:
    """The prompt as training would tokenize it, ending in the generation prompt (an Example without labels).

    The conversation gets a placeholder reply and goes through training's own formatting (image token
    counts, grids, tokenization in runs between replies); the tokens before that reply are the prompt.
    """
    conv = Conversation([*prompt.turns, Turn("assistant", [Part(type="text", text="-")])], source=prompt.source,
                        tools=list(prompt.tools))
    try:  # an image (say, over the pixel limit) is a problem of its row, as in training
        dims = [image_size(Path(p)) for p in conv.images]
        example = format_example(conv, loaded.prompt_formatter, loaded.family, dims, loaded.processor)
    except ValueError as e:  # ImageProblem included
        raise VlmtuneError(f"{prompt.source}: {e}") from None
    start = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    return Example(example.input_ids[:start], [IGNORE_INDEX] * start, example.images, example.grids, prompt.source)


def model_inputs(loaded: Loaded, examples: list[Example]) -> dict:
    """One left-padded batch: training's dataset transform and collator, then padding moved to the left."""
    from .data.collator import VisionCollator
    from .data.dataset import to_dataset

    tok = loaded.formatter.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    dataset = to_dataset(examples, loaded.family, loaded.processor)
    fam = loaded.family
    batch = VisionCollator(pad, concat_keys=fam.concat_keys)([dataset[i] for i in range(len(examples))])
    batch.pop("labels")
    batch.pop("position_ids", None)  # generate() derives positions from the attention mask and the token inputs
    ids, mask = batch["input_ids"], batch["attention_mask"]
    left_ids, left_mask = torch.full_like(ids, pad), torch.zeros_like(mask)
    for i in range(len(examples)):
        n = int(mask[i].sum())
        left_ids[i, ids.shape[1] - n:] = ids[i, :n]
        left_mask[i, ids.shape[1] - n:] = 1
    batch["input_ids"], batch["attention_mask"] = left_ids, left_mask
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


def predict(model, images: list | None = None, prompt: str | None = None, data=None, out=None, *,
            base: str | None = None, image_root: str | None = None, max_new_tokens: int = 64,
            temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8, seed: int = 0,
            dtype: str | None = None, progress: bool = True, loaded: Loaded | None = None,
            data_format: str | None = None) -> list[dict]:
    """Generate for one prompt (with images) or every row of a data file; write JSONL to `out` if given
    (checked before any work, and streamed to `<out>.partial` as each batch finishes; see PredictionFile).

    Returns one record per input: {"row", "prediction", "reference", "source"}.
    """
    from tqdm.auto import tqdm

    _validate(images, prompt, data, max_new_tokens, temperature, top_p, batch_size)
    sink = PredictionFile(Path(out)) if out is not None else None  # refuses an unwritable --out before any work
    with _keep_partial(sink):
        if prompt is not None:
            prompts = [single_prompt(images, prompt)]
        else:
            fmt, options = _data_settings(model, data_format)
            prompts = read_prompts(data, image_root, fmt, options)
        if loaded is None:
            if dtype is not None and dtype not in DTYPES:
                raise VlmtuneError(f"dtype must be bf16, fp16 or fp32, got {dtype!r}")
            loaded = load_for_inference(model, base=base, dtype=DTYPES.get(dtype) if dtype else None)
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
                          "source": prompts[i].source} for i, text in zip(idx, texts, strict=True)]
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


class PredictionFile:
    """`--out` written as predictions come: each batch is appended to `<out>.partial` at once, and the finished
    file (in input order) replaces `out` at the end. After a crash the partial file keeps what was done; the next
    run to the same `out` moves it aside (`<out>.<time>.partial`) rather than writing over it."""

    def __init__(self, out: Path):
        if out.is_dir():
            raise VlmtuneError(f"--out {out} is a folder; give a file name, e.g. {out / 'predictions.jsonl'}")
        self.out, self.partial, self.done, self.total = out, out.with_name(out.name + ".partial"), 0, 0
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            _keep_earlier(self.partial)
            self.file = open(self.partial, "w", encoding="utf-8")  # noqa: SIM115 (closed in finish/abandon)
        except OSError as e:
            raise VlmtuneError(f"cannot write --out {out}: {e.strerror or e} ({e.filename or self.partial}); "
                               "choose a file in a folder you can write to") from None

    def add(self, records: list[dict], total: int) -> None:
        self.total = total
        try:
            self.file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            self.file.flush()
        except OSError as e:
            raise VlmtuneError(f"writing predictions to {self.partial} failed: {e.strerror or e}") from None
        self.done += len(records)

    def finish(self, records: list[dict]) -> None:
        self.file.close()
        write_jsonl(self.out, records)
        self.partial.unlink()

    def abandon(self) -> str:
        """Close the partial file after a failure: what to tell the user ('' when nothing was done)."""
        self.file.close()
        if not self.done:
            self.partial.unlink(missing_ok=True)
            return ""
        return (f"the {self.done} of {self.total} predictions made before this are in {self.partial} "
                "(one JSON record per line, in the order they were made)")


def _keep_earlier(partial: Path) -> None:
    """Move an earlier run's partial predictions aside, named by when they were written, and say where."""
    if not partial.is_file() or partial.stat().st_size == 0:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(partial.stat().st_mtime))
    stem = partial.name.removesuffix(".partial")
    aside, n = partial.with_name(f"{stem}.{stamp}.partial"), 1
    while aside.exists():
        n += 1
        aside = partial.with_name(f"{stem}.{stamp}-{n}.partial")
    os.rename(partial, aside)
    print(f"predict: the predictions an earlier run left in {partial} are kept in {aside}", file=sys.stderr)


def _validate(images, prompt, data, max_new_tokens, temperature, top_p, batch_size) -> None:
    if (prompt is None) == (data is None):
        raise VlmtuneError("give either a prompt (with --image files) or a data file (--data), not both or neither")
    if images and prompt is None:
        raise VlmtuneError("--image goes with --prompt; a data file names its images itself")
    if max_new_tokens <= 0 or batch_size <= 0:
        raise VlmtuneError("max_new_tokens and batch_size must be positive")
    if temperature < 0 or not 0 < top_p <= 1:
        raise VlmtuneError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def exact_matches(records: list[dict]) -> tuple[int, int]:
    """(predictions equal to their reference, rows with a reference)."""
    scored = [r for r in records if r["reference"] is not None]
    return sum(r["prediction"].strip() == r["reference"].strip() for r in scored), len(scored)
