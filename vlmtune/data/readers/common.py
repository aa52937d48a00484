"""Pieces every row reader shares: the row error, roles, media lists and tags, row-level fields, the Conversation."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..conversation import Conversation, Part, Turn
from ..images import ImageProblem

IMAGE_TAG, VIDEO_TAG, AUDIO_TAG = "<image>", "<video>", "<audio>"
TAGS = {"image": IMAGE_TAG, "video": VIDEO_TAG, "audio": AUDIO_TAG}
ROLE_NAMES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# tool-calling turns of LLaMA-Factory (function_call, observation), ms-swift (tool_call, tool_response) and OpenAI
TOOL_ROLES = ("function_call", "observation", "tool", "tool_call", "tool_response", "function", "ipython")
METADATA = ("id",)  # keys any layout accepts without using them
NO_AUDIO = "no model family vlmtune trains takes audio"
DEFAULT_CAPTION_PROMPT = "Describe this image."

Resolve = Callable[[object], str]


class RowError(ValueError):
    """What is wrong with one row, in words a user can act on."""


@dataclass(frozen=True)
class Options:
    """Recipe settings a reader may need beyond the row itself."""

    caption_prompt: str = DEFAULT_CAPTION_PROMPT


class Row(dict):
    """A row after the `data.columns` mapping: `names` remembers which column each field came from, `unused`
    collects the keys inside it (of messages, of content parts) that the reader read past."""

    names: dict[str, str] = {}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unused: set[str] = set()

    def label(self, key: str) -> str:
        source = self.names.get(key)
        return f'"{key}" (column "{source}")' if source else f'"{key}"'


def label(row: dict, key: str) -> str:
    return row.label(key) if isinstance(row, Row) else f'"{key}"'


def note_unused(row: dict, obj: dict, known: tuple[str, ...], what: str) -> None:
    """Record the keys of `obj` (a message, a part) that are set but not in `known`."""
    if isinstance(row, Row):
        row.unused.update(f'{what} key "{k}"' for k, v in obj.items() if v is not None and k not in known)


def text_field(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        raise RowError(f"missing {label(row, key)}")
    if not isinstance(value, str):
        raise RowError(f"{label(row, key)} must be a string, got {value!r}"[:300])
    return value


def history_pairs(row: dict, pair: str, field: str = "history") -> list[tuple[str, str]]:
    """The earlier turns as (user text, reply) pairs: `[[q1, a1], ...]` (Alpaca's and ms-swift's `history`).

    `pair` names the two items in errors, e.g. `[question, answer]`."""
    value = row.get(field)
    if value is None:
        return []
    if not isinstance(value, list):
        raise RowError(f"{label(row, field)} must be a list of {pair} pairs, got {value!r}"[:300])
    for k, item in enumerate(value):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(t, str) for t in item)):
            raise RowError(f"{label(row, field)}[{k}] must be a {pair} pair of strings, got {item!r}"[:300])
    return [tuple(item) for item in value]


def image_refs(value: object, field: str, what: str = "an image reference") -> list:
    """A media field (one reference, a list of them, or null) as a list of references."""
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, (str, dict, bytes)):
        return [value]
    raise RowError(f'"{field}" must be {what} or a list of them, got {value!r}'[:300])


def resolve_all(refs: list, resolve: Resolve, field: str) -> list[str]:
    out = []
    for k, ref in enumerate(refs):
        try:
            out.append(resolve(ref))
        except ImageProblem as e:
            raise RowError(f"{field}[{k}]: {e}" if len(refs) > 1 else f"{field}: {e}") from None
    return out


def video_ref(ref: object, resolve: Resolve, where: str) -> str | tuple[str, ...]:
    """A video file as a local path, or a list of frame images as a tuple of paths."""
    if isinstance(ref, list):
        if not ref:
            raise RowError(f"{where}: a video given as frames needs at least one frame")
        try:
            return tuple(resolve(f) for f in ref)
        except ImageProblem as e:
            raise RowError(f"{where}: video frame: {e}") from None
    if not isinstance(ref, str) or not ref.strip() or ref.startswith(("data:", "http://", "https://")):
        raise RowError(f'{where}: a video must be a local video file path or a list of frame images, got {ref!r}'
                       [:300])
    try:
        return resolve(ref)
    except ImageProblem as e:
        raise RowError(f"{where}: {e}") from None


def refuse_audio(row: dict, field: str = "audios") -> None:
    if image_refs(row.get(field), field, "an audio file"):
        raise RowError(f'{label(row, field)} holds audio, but {NO_AUDIO}; leave such rows out or remove the audio')


class Pool:
    """One media list of a row (`images`, `videos`), handed out to tags and to parts that name no file of their own.

    `field` None: the layout has no such list, so any tag or part that needs one is refused."""

    def __init__(self, kind: str, refs: list, field: str | None, resolve: Resolve):
        self.kind, self.field = kind, field
        if kind == "image":
            self.items = resolve_all(refs, resolve, field) if refs else []
        else:
            self.items = [video_ref(ref, resolve, f"{field}[{k}]" if len(refs) > 1 else field)
                          for k, ref in enumerate(refs)]
        self.used: list[int] = []

    def take(self, index: object, where: str, by: str) -> str | tuple[str, ...]:
        """The item at `index`, or else the first one not taken yet; `by` says what asks ("an image part")."""
        if isinstance(index, int) and not isinstance(index, bool):
            k = index
        else:
            k = next((n for n in range(len(self.items)) if n not in self.used), len(self.items))
        if self.field is None:
            raise RowError(f"{where}: {by}, but this layout has no list of {self.kind}s to take one from")
        if not self.items:
            raise RowError(f'{where}: {by} names no {self.kind} of its own, and the row has no "{self.field}" '
                           f"to take one from")
        if not 0 <= k < len(self.items):
            raise RowError(f'{where}: {by} without its own {self.kind}, but "{self.field}" has no {self.kind} {k} '
                           f"({len(self.items)} given)")
        if k in self.used:
            raise RowError(f'{where}: {self.kind} {k} of "{self.field}" is used twice')
        self.used.append(k)
        return self.items[k]

    def check_all_used(self) -> None:
        if sorted(self.used) != list(range(len(self.items))):
            raise RowError(f'{len(self.used)} {self.kind} parts or {TAGS[self.kind]} tags without their own '
                           f'{self.kind} but {len(self.items)} {self.kind}s in "{self.field}"')


def media_pools(row: dict, resolve: Resolve, images: str | None, videos: str | None) -> dict[str, Pool]:
    """The row's image and video lists (fields named by the layout; None where it has none), audio refused."""
    refuse_audio(row)
    pools = {}
    for kind, field in (("image", images), ("video", videos)):
        what = "an image reference" if kind == "image" else "a video (a file, or a list of frames)"
        refs = image_refs(row.get(field), field, what) if field else []
        pools[kind] = Pool(kind, refs, field, resolve)
    return pools


def role_of(value: object, i: int) -> str:
    if isinstance(value, str) and value in TOOL_ROLES:
        raise RowError(f"message {i}: role {value!r} is a tool call or a tool result, which vlmtune does not train: "
                       "the reply would have to be located in the template's tool-call rendering; leave such rows "
                       "out or write the turn as plain user / assistant text")
    if not isinstance(value, str) or value not in ROLE_NAMES:
        raise RowError(f"message {i}: unknown role {value!r} (expected human/user, gpt/assistant or system)"[:300])
    return ROLE_NAMES[value]


TRAIN_KEYS = ("train", "loss", "weight")  # vlmtune's, ms-swift's and OpenAI fine-tuning's per-message loss flag


def train_flag(msg: dict, i: int) -> bool:
    """`"train": false`, `"loss": false` or `"weight": 0`: this reply stays out of the loss."""
    flags = set()
    for key in TRAIN_KEYS:
        value = msg.get(key)
        if value is None:
            continue
        if key == "weight" and value in (0, 1) and not isinstance(value, bool):
            value = bool(value)
        if not isinstance(value, bool):
            expected = "0 or 1" if key == "weight" else "true or false"
            raise RowError(f'message {i}: "{key}" must be {expected}, got {value!r}'[:300])
        flags.add(value)
    if len(flags) > 1:
        raise RowError(f'message {i}: "train", "loss" and "weight" disagree; give one of them')
    return flags.pop() if flags else True


def tagged_turns(messages: list[tuple[str, str, bool]], pools: dict[str, Pool]) -> list[Turn]:
    """(role, text with `<image>` / `<video>` tags, train) messages + the row's media -> turns of typed parts.

    Each tag takes one newline next to it (the one after it, else the one before), so `"<image>\\nWhat?"`
    reads as [image, "What?"]. One image and no tag anywhere: the image goes first in the first user turn.
    """
    images = pools["image"]
    found = {kind: sum(text.count(tag) for _, text, _ in messages) for kind, tag in TAGS.items()}
    if found["audio"]:
        raise RowError(f"{AUDIO_TAG} in the text, but {NO_AUDIO}; leave such rows out")
    if found["image"] == 0 and len(images.items) == 1:
        first_user = next((k for k, (role, _, _) in enumerate(messages) if role == "user"), None)
        if first_user is None:
            raise RowError(f'one image in "{images.field}" but no user message to put it in')
        role, text, train = messages[first_user]
        messages = [*messages[:first_user], (role, IMAGE_TAG + text, train), *messages[first_user + 1:]]
        found["image"] = 1
    for kind, pool in pools.items():
        n, tag, given = found[kind], TAGS[kind], len(pool.items)
        if n != given:
            where = f'in "{pool.field}"' if pool.field else "(this layout takes none)"
            raise RowError(f'{n} {tag} placeholder{"s" if n != 1 else ""} in the text but {given} '
                           f'{kind}{"s" if given != 1 else ""} {where}')
    return [Turn(role, split_tags(text, pools, f"message {i}"), train) for i, (role, text, train) in enumerate(messages)]


_TAG_RE = re.compile("(" + "|".join(map(re.escape, TAGS.values())) + ")")


def split_tags(text: str, pools: dict[str, Pool], where: str) -> list[Part]:
    """Text with media tags -> parts; each tag takes the next item of its pool (and one newline beside it)."""
    pieces = _TAG_RE.split(text)  # text, tag, text, tag, ..., text
    for k in range(1, len(pieces), 2):
        if pieces[k + 1].startswith("\n"):
            pieces[k + 1] = pieces[k + 1][1:]
        elif pieces[k - 1].endswith("\n"):
            pieces[k - 1] = pieces[k - 1][:-1]
    parts = []
    for k, piece in enumerate(pieces):
        if k % 2:
            kind = next(kind for kind, tag in TAGS.items() if tag == piece)
            if kind == "audio":
                raise RowError(f"{where}: {AUDIO_TAG} in the text, but {NO_AUDIO}; leave such rows out")
            item = pools[kind].take(None, where, f"a literal {piece} tag in the text")
            parts.append(Part(type="image", image=item) if kind == "image" else Part(type="video", video=item))
        elif piece:
            parts.append(Part(type="text", text=piece))
    return parts or [Part(type="text", text="")]


def with_row_system(row: dict, turns: list[Turn], field: str = "system") -> list[Turn]:
    """The row-level system prompt (LLaMA-Factory's and ms-swift's `"system"`) as the first turn."""
    system = row.get(field)
    if system is None or system == "":
        return turns
    if not isinstance(system, str):
        raise RowError(f"{label(row, field)} must be a string, got {system!r}"[:300])
    if turns and turns[0].role == "system":
        raise RowError(f'both {label(row, field)} and a system message; give the system prompt once')
    return [Turn("system", [Part(type="text", text=system)]), *turns]


def tools_of(row: dict, field: str = "tools") -> list[dict]:
    """Tool definitions (a list, or a JSON string of one as LLaMA-Factory stores them) for the chat template."""
    value = row.get(field)
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(f"{label(row, field)} is a string but not JSON ({e.msg}); give a list of tool "
                           'definitions, e.g. [{"type": "function", "function": {"name": ..., "parameters": {...}}}]'
                           ) from None
    if value is None:
        return []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RowError(f"{label(row, field)} must be a list of tool definitions (objects), got {value!r}"[:300])
    return value


def finish(turns: list[Turn], tools: list[dict] = (), **meta) -> Conversation:
    """The Conversation, or RowError listing every invariant it breaks."""
    conv = Conversation(turns=turns, meta={k: v for k, v in meta.items() if v is not None}, tools=list(tools))
    problems = conv.problems()
    if problems:
        raise RowError("; ".join(problems))
    return conv


MESSAGE_KEYS = ("role", "from", "content", "value", *TRAIN_KEYS)


def chat_messages(row: dict, field: str) -> list[tuple[str, str, bool]]:
    """`[{"from"|"role": ..., "value"|"content": "text with <image> tags"}, ...]` -> (role, text, train)."""
    msgs = row.get(field)
    if not isinstance(msgs, list):
        raise RowError(f'"{field}" must be a list of {{"from": ..., "value": ...}} messages, got {msgs!r}'[:300])
    out = []
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict):
            raise RowError(f"message {i}: expected an object, got {msg!r}"[:300])
        refuse_tool_calls(msg, i)
        role = msg.get("from") if msg.get("role") is None else msg["role"]
        text = msg.get("value") if msg.get("content") is None else msg["content"]
        if role is None or text is None:
            raise RowError(f'message {i}: expected "from" (or "role") and "value" (or "content")')
        if not isinstance(text, str):
            raise RowError(f'message {i}: the text must be a string with {IMAGE_TAG} tags for images, got {text!r}'
                           [:300])
        note_unused(row, msg, MESSAGE_KEYS, "message")
        out.append((role_of(role, i), text, train_flag(msg, i)))
    return out


def refuse_tool_calls(msg: dict, i: int) -> None:
    if msg.get("tool_calls") or msg.get("function_call"):
        raise RowError(f"message {i}: tool calls are not trained by vlmtune (the reply would have to be located in "
                       "the template's tool-call rendering); leave such rows out or write the call as plain text")


def single_turn(row: dict, resolve: Resolve, prompt: str, reply_key: str) -> Conversation:
    """One user turn (the row's images, then the prompt) and one reply taken from `row[reply_key]`.

    A prompt with `<image>` tags places the images where the tags are instead."""
    if row.get("image") is None:
        raise RowError(f"missing {label(row, 'image')}")
    reply = text_field(row, reply_key)
    if not reply.strip():
        raise RowError(f"{label(row, reply_key)} is empty: there is nothing to train on")
    pools = {"image": Pool("image", image_refs(row["image"], "image"), "image", resolve),
             "video": Pool("video", [], None, resolve)}
    if _TAG_RE.search(prompt) or _TAG_RE.search(reply):
        return finish(tagged_turns([("user", prompt, True), ("assistant", reply, True)], pools))
    user = [*(Part(type="image", image=p) for p in pools["image"].items), Part(type="text", text=prompt)]
    return finish([Turn("user", user), Turn("assistant", [Part(type="text", text=reply)])])


class Unused:
    """What the rows of one file hold that their reader does not read, each name reported once.

    `known`: the columns it reads; `reader`: who reads them ("format vqa"); `hint`: how to have one read."""

    def __init__(self, known, reader: str, hint: str):
        self.reader, self.hint = reader, hint
        self.known = {*known, *METADATA}
        self.seen: set[str] = set()

    def new(self, raw: dict, row: Row) -> str | None:
        """A warning naming what this row holds unread that no earlier row of the file did, or None."""
        names = [f'column "{k}"' for k, v in raw.items() if v is not None and k not in self.known]
        fresh = [n for n in [*names, *sorted(row.unused)] if n not in self.seen]
        if not fresh:
            return None
        self.seen.update(fresh)
        return f"not read by {self.reader}, so ignored (reported once per file): {', '.join(fresh)}; {self.hint}"
