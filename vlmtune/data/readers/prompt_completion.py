"""TRL prompt-completion rows: `{"prompt": [messages], "completion": [messages], "images"?: [...]}`, or the standard
form `{"prompt": "...", "completion": "..."}`. Only the completion is trained on.

Messages are read as `messages` rows read them (string content or typed parts; `{"type": "image"}` parts take the
row's `images` in order, as `<image>` tags in a text do). When no message places an image, the images go first in
the first user message of the prompt, where TRL puts them. A string prompt is one user message and a string
completion one assistant message.
"""

from __future__ import annotations

from ..conversation import Conversation
from . import messages
from .common import IMAGE_TAG, Options, Resolve, RowError, image_refs, label
from .recast import read_as

REQUIRED = ("prompt", "completion")
OPTIONAL = ("images", "image")  # TRL: a list of images, or one image


def read(row: dict, resolve: Resolve, options: Options, completion_key: str = "completion") -> Conversation:
    """The row as one conversation; `completion_key` names the reply's field (a preference row's "chosen")."""
    prompt = [_prompt_message(m, i) for i, m in enumerate(_messages(row, "prompt", "user"))]
    completion = _messages(row, completion_key, "assistant")
    for j, msg in enumerate(completion):
        if msg.get("role") != "assistant":
            raise RowError(f"{completion_key} message {j}: role {msg.get('role')!r}; the {completion_key} holds the "
                           'assistant reply only (earlier turns belong in "prompt")')
    if row.get("images") is not None and row.get("image") is not None:
        raise RowError(f'both {label(row, "images")} and {label(row, "image")}: give the images in one of them')
    key = "images" if row.get("images") is not None else "image"
    images = image_refs(row.get(key), key)
    if images and not any(_places_images(m) for m in (*prompt, *completion)):
        prompt = _images_first(prompt, len(images))
    n = len(prompt)
    return read_as(messages, {"messages": [*prompt, *completion], "images": images}, resolve, options,
                   lambda i: f"prompt message {i}" if i < n else f"{completion_key} message {i - n}", row)


def _messages(row: dict, key: str, role: str) -> list[dict]:
    value = row.get(key)
    if value is None:
        raise RowError(f'missing {label(row, key)}: a prompt-completion row is {{"prompt": [{{"role": "user", '
                       '"content": ...}], "completion": [{"role": "assistant", "content": ...}]}')
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise RowError(f'{label(row, key)} must be a string or a non-empty list of {{"role", "content"}} messages, '
                       f"got {value!r}"[:300])
    return value


def _prompt_message(msg: dict, i: int) -> dict:
    """A prompt message; an assistant turn in the prompt is context, never trained on."""
    if msg.get("role") != "assistant":
        return msg
    if msg.get("train") is True:
        raise RowError(f'prompt message {i}: "train": true, but only the completion is trained on; '
                       'move the reply into "completion"')
    return {**msg, "train": False}


def _places_images(msg: dict) -> bool:
    """Whether the message says where images go: an image part, or an `<image>` tag in its text."""
    content = msg.get("content")
    if isinstance(content, str):
        return IMAGE_TAG in content
    return isinstance(content, list) and any(
        isinstance(p, dict) and (p.get("type") in ("image", "image_url") or IMAGE_TAG in str(p.get("text") or ""))
        for p in content)


def _images_first(prompt: list[dict], count: int) -> list[dict]:
    """The row's images as the first parts of the first user message (TRL's placement for untagged images)."""
    k = next((k for k, m in enumerate(prompt) if m.get("role") == "user"), None)
    if k is None:
        raise RowError(f'{count} image{"s" if count != 1 else ""} but no user message in "prompt" to put '
                       f'{"them" if count != 1 else "it"} in')
    content = prompt[k].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
    return [*prompt[:k], {**prompt[k], "content": [*({"type": "image"} for _ in range(count)), *parts]},
            *prompt[k + 1:]]
