"""`messages` rows (typed parts): `{"messages": [{"role", "content": str | [parts]}], "images"?: [...], "videos"?: [...]}`.

A content part is text, an image or a video in the forms users copy from other tools (see PART_FORMS). An image
(video) part that names no file takes one from the row's `"images"` (`"videos"`) list: by `"index"` when given,
else the next in order (the layout of many Hugging Face datasets); so does each `<image>` (`<video>`) tag in
a text (ms-swift's layout). A video is a file (`"clip.mp4"`) or a list of frame images, resolved like image paths.
Row-level `"system"` is the system prompt, `"tools"` go to the chat template.
"""

from __future__ import annotations

from ..conversation import Conversation, Part, Turn
from ..images import ImageProblem
from .common import (
    NO_AUDIO,
    TRAIN_KEYS,
    Options,
    Pool,
    Resolve,
    RowError,
    finish,
    media_pools,
    note_unused,
    refuse_tool_calls,
    role_of,
    split_tags,
    tools_of,
    train_flag,
    video_ref,
    with_row_system,
)

REQUIRED = ("messages",)
OPTIONAL = ("images", "videos", "audios", "system", "tools")

# part type -> the keys that may hold its file, in the order they are looked at
IMAGE_KEYS = {"image": ("image", "path", "url", "base64"), "image_url": ("image_url", "value")}
VIDEO_KEYS = {"video": ("video", "path", "url"), "video_url": ("video_url", "value")}
AUDIO_TYPES = ("audio", "input_audio", "audio_url")
PART_FORMS = ('{"type": "text", "text": ...}, {"type": "image", "image" | "path" | "url" | "base64": ...}, '
              '{"type": "image_url", "image_url": {"url": ...}} (or "value": ...), '
              '{"type": "video", "video" | "path" | "url": "clip.mp4" | ["frame0.jpg", ...]}')
MESSAGE_KEYS = ("role", "content", *TRAIN_KEYS)


def read(row: dict, resolve: Resolve, options: Options) -> Conversation:
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise RowError('expected an object with a "messages" list, e.g. '
                       '{"messages": [{"role": "user", "content": [...]}, {"role": "assistant", ...}]}')
    pools = media_pools(row, resolve, images="images", videos="videos")
    turns = []
    for i, msg in enumerate(row["messages"]):
        if not isinstance(msg, dict) or msg.get("role") is None or msg.get("content") is None:
            refuse_tool_calls(msg if isinstance(msg, dict) else {}, i)
            raise RowError(f'message {i}: expected an object with "role" and "content"')
        refuse_tool_calls(msg, i)
        note_unused(row, msg, MESSAGE_KEYS, "message")
        role = role_of(msg["role"], i)
        turns.append(Turn(role, _parts(row, msg["content"], i, resolve, pools), train=train_flag(msg, i)))
    for pool in pools.values():
        pool.check_all_used()
    return finish(with_row_system(row, turns), tools=tools_of(row))


def _parts(row: dict, content: object, i: int, resolve: Resolve, pools: dict[str, Pool]) -> list[Part]:
    if isinstance(content, str):
        return split_tags(content, pools, f"message {i}")
    if not isinstance(content, list):
        raise RowError(f"message {i}: content must be a string or a list of typed parts")
    parts = []
    for j, part in enumerate(content):
        where = f"message {i} part {j}"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            note_unused(row, part, ("type", "text"), "content part")
            parts.extend(split_tags(part["text"], pools, where))
        elif kind in IMAGE_KEYS:
            parts.append(Part(type="image", image=_media(row, part, IMAGE_KEYS[kind], pools["image"], resolve, where)))
        elif kind in VIDEO_KEYS:
            parts.append(Part(type="video", video=_media(row, part, VIDEO_KEYS[kind], pools["video"], resolve, where)))
        elif kind in AUDIO_TYPES:
            raise RowError(f"{where}: an {kind} part, but {NO_AUDIO}; leave such rows out or remove the audio")
        else:
            raise RowError(f"{where}: unknown content part {part!r}; expected {PART_FORMS}"[:600])
    return parts


def _media(row: dict, part: dict, keys: tuple[str, ...], pool: Pool, resolve: Resolve, where: str):
    """The file an image or video part names under one of `keys`, else the next of the row's list."""
    note_unused(row, part, ("type", "index", *keys), "content part")
    key = next((k for k in keys if part.get(k) is not None), None)
    if key is None:
        strays = [k for k, v in part.items() if v is not None and k not in ("type", "index")]
        if strays:  # a misspelt key, not a part that means to take from the row's list
            raise RowError(f'{where}: {pool.kind} part with {", ".join(map(repr, strays))} but no file under '
                           f'{" / ".join(map(repr, keys))}; expected {PART_FORMS}'[:600])
        return pool.take(part.get("index"), where, f"{'an' if pool.kind == 'image' else 'a'} {pool.kind} part")
    ref = part[key]
    if key in ("image_url", "video_url") and isinstance(ref, dict):
        ref = ref.get("url")
    if key == "base64" and isinstance(ref, str) and not ref.startswith("data:"):
        ref = "data:image/*;base64," + ref  # transformers' bare base64: the format comes from the bytes
    if pool.kind == "video":
        return video_ref(ref, resolve, where)
    try:
        return resolve(ref)
    except ImageProblem as e:
        raise RowError(f"{where}: {e}") from None
