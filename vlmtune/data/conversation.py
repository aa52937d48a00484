"""The one conversation type every data format is read into."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


class TrainOn(str, enum.Enum):
    """Which tokens carry a loss."""

    ASSISTANT = "assistant"  # every assistant reply (and its end-of-turn token)
    LAST_ASSISTANT = "last_assistant"  # only the final assistant reply
    ALL = "all"  # the whole sequence except image, video and padding tokens


@dataclass(frozen=True)
class Part:
    """Text, one image (a resolved path), or one video: a video file path or a tuple of frame image paths."""

    type: str  # "text" | "image" | "video"
    text: str = ""
    image: str | None = None
    video: str | tuple[str, ...] | None = None


@dataclass
class Turn:
    role: str
    parts: list[Part]
    train: bool = True  # a `"train": false` message keeps its reply out of the loss

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if p.type == "text")

    @property
    def images(self) -> list[str]:
        return [p.image for p in self.parts if p.type == "image"]

    @property
    def videos(self) -> list[str | tuple[str, ...]]:
        return [p.video for p in self.parts if p.type == "video"]


@dataclass
class Conversation:
    turns: list[Turn]
    source: str = ""  # "file.jsonl:row 12" for messages that name the sample
    meta: dict = field(default_factory=dict)
    tools: list[dict] = field(default_factory=list)  # tool definitions, passed to the chat template as `tools`

    @property
    def images(self) -> list[str]:
        return [img for turn in self.turns for img in turn.images]

    @property
    def videos(self) -> list[str | tuple[str, ...]]:
        return [v for turn in self.turns for v in turn.videos]

    def problems(self) -> list[str]:
        """Invariant violations, in words a user can act on (empty when fine)."""
        out = []
        if not self.turns:
            return ["the conversation has no messages"]
        first = next((i for i, t in enumerate(self.turns) if t.role != "system"), None)
        if first is not None and self.turns[first].role == "assistant":  # a reply to no prompt
            out.append(f"message {first}: the conversation starts with an assistant reply; the first message "
                       "after the optional system message must be the user's")
        for i, turn in enumerate(self.turns):
            if turn.role not in ROLES:
                out.append(f"message {i}: unknown role {turn.role!r} (expected one of {', '.join(ROLES)})")
            if turn.role == "system" and i != 0:
                out.append(f"message {i}: a system message may only come first")
            if turn.role == "assistant" and not turn.text.strip():
                out.append(f"message {i}: the assistant reply is empty")
            if turn.role == "assistant" and turn.images:
                out.append(f"message {i}: assistant messages cannot contain images")
            if turn.role == "assistant" and turn.videos:
                out.append(f"message {i}: assistant messages cannot contain videos")
        if not any(t.role == "assistant" for t in self.turns):
            out.append("no assistant message: there is nothing to train on")
        return out


@dataclass
class ConversationPair:
    """One preference row: the prompt (its turns end with the user's) and two replies to it, chosen over rejected."""

    prompt: list[Turn]
    chosen: Turn
    rejected: Turn
    source: str = ""

    def conversation(self, side: str) -> Conversation:
        """The prompt followed by one reply (`side`: "chosen" or "rejected")."""
        return Conversation([*self.prompt, getattr(self, side)], source=self.source)

    @property
    def images(self) -> list[str]:
        return [img for turn in self.prompt for img in turn.images]
