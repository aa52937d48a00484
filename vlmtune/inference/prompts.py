"""The prompts to predict for: one question with its images, or every row of a data file read as training reads it
(the final assistant reply of a row is its reference answer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data.conversation import Part, Turn
from ..data.images import ImageProblem, image_size
from ..errors import VlmtuneError
from ..run_metadata import read_metadata


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
    from ..data.images import ImageResolver
    from ..data.readers import llamafactory, sources
    from ..data.readers.common import RowError

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
    from ..data.formats import RowProblem, read_rows
    from ..data.formatting import template_messages

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


def data_settings(model, data_format: str | None) -> tuple[str, dict]:
    """The data format and reader options: given, else as the adapter or merged model was trained."""
    data = read_metadata(Path(str(model))).get("data") or {}
    options = {"columns": data.get("columns") or {}}
    if data.get("caption_prompt"):
        options["caption_prompt"] = data["caption_prompt"]
    return data_format or data.get("format") or "messages", options


def _prompt_from_row(row, resolve, source: str) -> Prompt:
    from ..data.readers import messages as reader
    from ..data.readers.common import Options

    messages = row.get("messages") if isinstance(row, dict) else None
    has_reply = bool(messages) and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant"
    parsed_row = row
    if isinstance(messages, list) and not has_reply:
        # the reader wants an assistant reply: a prompt-only row gets a placeholder, dropped again below
        parsed_row = {**row, "messages": [*messages, {"role": "assistant", "content": "-"}]}
    conversation = reader.read(parsed_row, resolve, Options())
    *turns, last = conversation.turns
    _check_images(turns)
    return Prompt(turns, row, last.text if has_reply else None, source, list(conversation.tools))
