"""`messages` rows (OpenAI-style typed parts): `{"messages": [{"role", "content": str | [parts]}], "images"?: [...]}`.

An image part names its image (`"image"`, `"path"` or `"image_url"`), or leaves it out and takes one from
the row's `"images"` list: by `"index"` when given, else the next in order (the layout of many Hugging
Face datasets). A video part names a video file (`{"type": "video", "video": "clip.mp4"}`) or a list of
frame images (`"video": ["f0.jpg", "f1.jpg", ...]`), resolved like image paths.
"""

from __future__ import annotations

from ..conversation import Conversation, Part, Turn
from ..images import ImageProblem
from .common import Options, Resolve, RowError, finish, image_refs, resolve_all, train_flag

REQUIRED = ("messages",)
OPTIONAL = ("images",)


def read(row: dict, resolve: Resolve, options: Options) -> Conversation:
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise RowError('expected an object with a "messages" list, e.g. '
                       '{"messages": [{"role": "user", "content": [...]}, {"role": "assistant", ...}]}')
    pool = _Pool(image_refs(row.get("images"), "images"), resolve)
    turns = []
    for i, msg in enumerate(row["messages"]):
        if not isinstance(msg, dict) or msg.get("role") is None or msg.get("content") is None:
            raise RowError(f'message {i}: expected an object with "role" and "content"')
        turns.append(Turn(role=msg["role"], parts=_parts(msg["content"], i, resolve, pool), train=train_flag(msg, i)))
    pool.check_all_used()
    return finish(turns)


class _Pool:
    """The row's `"images"` list, handed out to image parts that do not name their image."""

    def __init__(self, refs: list, resolve: Resolve):
        self.refs = refs
        self.paths = resolve_all(refs, resolve, "images") if refs else []
        self.used: list[int] = []

    def take(self, index: object, where: str) -> str:
        """The image at `index`, or else the first one no part has taken yet."""
        if isinstance(index, int) and not isinstance(index, bool):
            k = index
        else:
            k = next((n for n in range(len(self.paths)) if n not in self.used), len(self.paths))
        if not 0 <= k < len(self.paths):
            raise RowError(f'{where}: an image part without an image, but "images" has no image {k} '
                           f"({len(self.paths)} given)")
        if k in self.used:
            raise RowError(f'{where}: image {k} of "images" is used twice')
        self.used.append(k)
        return self.paths[k]

    def check_all_used(self) -> None:
        if sorted(self.used) != list(range(len(self.paths))):
            raise RowError(f'{len(self.used)} image parts without their own image but {len(self.paths)} images '
                           'in "images"')


def _parts(content: object, i: int, resolve: Resolve, pool: _Pool) -> list[Part]:
    if isinstance(content, str):
        return [Part(type="text", text=content)]
    if not isinstance(content, list):
        raise RowError(f"message {i}: content must be a string or a list of typed parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(Part(type="text", text=part["text"]))
        elif kind in ("image", "image_url"):
            ref = part.get("image") if part.get("image") is not None else part.get("path")
            if kind == "image_url":
                url = part.get("image_url")
                ref = url.get("url") if isinstance(url, dict) else url
            if ref is None:
                parts.append(Part(type="image", image=pool.take(part.get("index"), f"message {i} part {j}")))
                continue
            try:
                parts.append(Part(type="image", image=resolve(ref)))
            except ImageProblem as e:
                raise RowError(f"message {i} part {j}: {e}") from None
        elif kind == "video":
            parts.append(Part(type="video", video=_video(part.get("video"), resolve, f"message {i} part {j}")))
        else:
            raise RowError(f"message {i} part {j}: unknown content part {part!r}; expected "
                           '{"type": "text", "text": ...}, {"type": "image", "image": "path.png"} or '
                           '{"type": "video", "video": "clip.mp4" | ["frame0.jpg", ...]}')
    return parts


def _video(ref: object, resolve: Resolve, where: str) -> str | tuple[str, ...]:
    """A video file as a local path, or a list of frame images as a tuple of paths."""
    if isinstance(ref, list):
        if not ref:
            raise RowError(f"{where}: a video given as frames needs at least one frame")
        try:
            return tuple(resolve(f) for f in ref)
        except ImageProblem as e:
            raise RowError(f"{where}: video frame: {e}") from None
    if not isinstance(ref, str) or not ref.strip() or ref.startswith(("data:", "http://", "https://")):
        raise RowError(f'{where}: "video" must be a local video file path or a list of frame images, got {ref!r}'
                       [:300])
    try:
        return resolve(ref)
    except ImageProblem as e:
        raise RowError(f"{where}: {e}") from None
