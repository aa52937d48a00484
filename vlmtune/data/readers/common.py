"""Pieces every row reader shares: the row error, role names, image lists, `<image>` tags, the finished Conversation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..conversation import Conversation, Part, Turn
from ..images import ImageProblem

IMAGE_TAG = "<image>"
ROLE_NAMES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
DEFAULT_CAPTION_PROMPT = "Describe this image."

Resolve = Callable[[object], str]


class RowError(ValueError):
    """What is wrong with one row, in words a user can act on."""


@dataclass(frozen=True)
class Options:
    """Recipe settings a reader may need beyond the row itself."""

    caption_prompt: str = DEFAULT_CAPTION_PROMPT


class Row(dict):
    """A row after the `data.columns` mapping; `names` remembers which column each field came from."""

    names: dict[str, str] = {}

    def label(self, key: str) -> str:
        source = self.names.get(key)
        return f'"{key}" (column "{source}")' if source else f'"{key}"'


def label(row: dict, key: str) -> str:
    return row.label(key) if isinstance(row, Row) else f'"{key}"'


def text_field(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        raise RowError(f"missing {label(row, key)}")
    if not isinstance(value, str):
        raise RowError(f"{label(row, key)} must be a string, got {value!r}")
    return value


def image_refs(value: object, field: str) -> list:
    """An image field (one reference, a list of them, or null) as a list of references."""
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, (str, dict, bytes)):
        return [value]
    raise RowError(f'"{field}" must be an image reference or a list of them, got {value!r}')


def resolve_all(refs: list, resolve: Resolve, field: str) -> list[str]:
    out = []
    for k, ref in enumerate(refs):
        try:
            out.append(resolve(ref))
        except ImageProblem as e:
            raise RowError(f"{field}[{k}]: {e}" if len(refs) > 1 else f"{field}: {e}") from None
    return out


def role_of(value: object, i: int) -> str:
    if not isinstance(value, str) or value not in ROLE_NAMES:
        raise RowError(f"message {i}: unknown role {value!r} (expected human/user, gpt/assistant or system)")
    return ROLE_NAMES[value]


def train_flag(msg: dict, i: int) -> bool:
    train = msg.get("train")
    if train is None:
        return True
    if not isinstance(train, bool):
        raise RowError(f'message {i}: "train" must be true or false, got {train!r}')
    return train


def tagged_turns(messages: list[tuple[str, str, bool]], refs: list, resolve: Resolve, field: str) -> list[Turn]:
    """(role, text with `<image>` tags, train) messages + their images -> turns of typed parts.

    Each tag takes one newline next to it (the one after it, else the one before), so `"<image>\\nWhat?"`
    reads as [image, "What?"]. One image and no tag anywhere: the image goes first in the first user turn.
    """
    found = sum(text.count(IMAGE_TAG) for _, text, _ in messages)
    if found == 0 and len(refs) == 1:
        first_user = next((k for k, (role, _, _) in enumerate(messages) if role == "user"), None)
        if first_user is None:
            raise RowError(f'one image in "{field}" but no user message to put it in')
        role, text, train = messages[first_user]
        messages = [*messages[:first_user], (role, IMAGE_TAG + text, train), *messages[first_user + 1:]]
        found = 1
    if found != len(refs):
        raise RowError(f'{found} {IMAGE_TAG} placeholder{"s" if found != 1 else ""} in the text but '
                       f'{len(refs)} image{"s" if len(refs) != 1 else ""} in "{field}"')
    paths = iter(resolve_all(refs, resolve, field))
    return [Turn(role, _split_tags(text, paths), train) for role, text, train in messages]


def _split_tags(text: str, paths) -> list[Part]:
    pieces = text.split(IMAGE_TAG)
    for k in range(1, len(pieces)):
        if pieces[k].startswith("\n"):
            pieces[k] = pieces[k][1:]
        elif pieces[k - 1].endswith("\n"):
            pieces[k - 1] = pieces[k - 1][:-1]
    parts = []
    for k, piece in enumerate(pieces):
        if k:
            parts.append(Part(type="image", image=next(paths)))
        if piece:
            parts.append(Part(type="text", text=piece))
    return parts or [Part(type="text", text="")]


def finish(turns: list[Turn], **meta) -> Conversation:
    """The Conversation, or RowError listing every invariant it breaks."""
    conv = Conversation(turns=turns, meta={k: v for k, v in meta.items() if v is not None})
    problems = conv.problems()
    if problems:
        raise RowError("; ".join(problems))
    return conv


def chat_messages(msgs: object, field: str) -> list[tuple[str, str, bool]]:
    """`[{"from"|"role": ..., "value"|"content": "text with <image> tags"}, ...]` -> (role, text, train)."""
    if not isinstance(msgs, list):
        raise RowError(f'"{field}" must be a list of {{"from": ..., "value": ...}} messages, got {msgs!r}'[:300])
    out = []
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict):
            raise RowError(f"message {i}: expected an object, got {msg!r}"[:300])
        role = msg.get("from") if msg.get("role") is None else msg["role"]
        text = msg.get("value") if msg.get("content") is None else msg["content"]
        if role is None or text is None:
            raise RowError(f'message {i}: expected "from" (or "role") and "value" (or "content")')
        if not isinstance(text, str):
            raise RowError(f'message {i}: the text must be a string with {IMAGE_TAG} tags for images, got {text!r}'
                           [:300])
        out.append((role_of(role, i), text, train_flag(msg, i)))
    return out


def single_turn(row: dict, resolve: Resolve, prompt: str, reply_key: str) -> Conversation:
    """One user turn (the row's images, then the prompt) and one reply taken from `row[reply_key]`."""
    if row.get("image") is None:
        raise RowError(f"missing {label(row, 'image')}")
    reply = text_field(row, reply_key)
    if not reply.strip():
        raise RowError(f"{label(row, reply_key)} is empty: there is nothing to train on")
    images = resolve_all(image_refs(row["image"], "image"), resolve, "image")
    user = [*(Part(type="image", image=p) for p in images), Part(type="text", text=prompt)]
    return finish([Turn("user", user), Turn("assistant", [Part(type="text", text=reply)])])
