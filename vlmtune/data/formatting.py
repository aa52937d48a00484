"""Conversation -> input_ids and labels, built together from the model's own chat template.

The template is the source of truth for the layout. For each assistant turn the prompt up to
it is rendered with the generation prompt, then the conversation including it; the difference
is the reply, its end-of-turn token and any trailing text. Prompt text is tokenized in runs
between replies, and each reply on its own, so the reply starts on a token boundary exactly as
it does when the model generates after the generation prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..families import Family
from .conversation import Conversation, TrainOn, Turn

IGNORE_INDEX = -100


class FormatError(ValueError):
    """A conversation the chat template cannot render the way training needs."""


@dataclass
class Formatted:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def template_messages(turns: list[Turn]) -> list[dict]:
    """Typed-content messages as chat templates expect them (images as bare `{"type": "image"}` parts)."""
    out = []
    for turn in turns:
        content = [{"type": "image"} if p.type == "image" else {"type": "text", "text": p.text} for p in turn.parts]
        out.append({"role": turn.role, "content": content})
    return out


class Formatter:
    """Formats conversations for one family + processor under one masking strategy."""

    def __init__(self, family: Family, processor, train_on: TrainOn | str = TrainOn.ASSISTANT,
                 system_prompt: str | None = None):
        self.family = family
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.train_on = TrainOn(train_on)
        self.system_prompt = system_prompt
        vocab = self.tokenizer.get_vocab()
        if family.image_token not in vocab:
            raise FormatError(f"the tokenizer has no image token {family.image_token!r} (family {family.name})")
        self.image_token_id = vocab[family.image_token]
        self.end_of_turn = "".join(family.end_of_turn)
        self.eos_text = self.tokenizer.eos_token if family.append_eos_after_reply else ""

    def render(self, turns: list[Turn], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            template_messages(turns), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def with_system_prompt(self, conv: Conversation) -> list[Turn]:
        turns = list(conv.turns)
        if self.system_prompt is not None and (not turns or turns[0].role != "system"):
            from .conversation import Part

            turns.insert(0, Turn(role="system", parts=[Part(type="text", text=self.system_prompt)]))
        return turns

    def segments(self, conv: Conversation) -> list[tuple[str, bool]]:
        """(text, supervised) pieces whose concatenation is the training text."""
        turns = self.with_system_prompt(conv)
        selected = self._selected_replies(turns)
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            prompt = self.render(turns[:i], add_generation_prompt=True)
            full = self.render(turns[: i + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise FormatError(f"{conv.source}: the chat template does not render turn {i} as a continuation "
                                  "of the turns before it, so the reply cannot be located")
            reply, tail = self._split_reply(full[len(prompt):], turn.text, conv.source, i)
            train = i in selected
            pieces.append((prompt[len(done):], False))
            pieces.append((reply, train))
            if self.eos_text:
                pieces.append((self.eos_text, train))
            elif tail.startswith(self.end_of_turn):
                pieces.append((self.end_of_turn, train))
                tail = tail[len(self.end_of_turn):]
            pieces.append((tail, False))
            done = full
        rest = self.render(turns, add_generation_prompt=False)
        pieces.append((rest[len(done):], False))
        if self.train_on is TrainOn.ALL:
            pieces = [(text, True) for text, _ in pieces]
        return [(t, s) for t, s in pieces if t]

    def _selected_replies(self, turns: list[Turn]) -> set[int]:
        replies = [i for i, t in enumerate(turns) if t.role == "assistant" and t.train]
        if self.train_on is TrainOn.LAST_ASSISTANT:
            last = max(i for i, t in enumerate(turns) if t.role == "assistant")
            return {last} & set(replies)
        return set(replies)

    def _split_reply(self, rendered: str, text: str, source: str, index: int) -> tuple[str, str]:
        if rendered.startswith(text):
            return text, rendered[len(text):]
        stripped = text.strip()
        at = rendered.find(stripped)
        if stripped and at >= 0 and not rendered[:at].strip():
            return rendered[: at + len(stripped)], rendered[at + len(stripped):]
        raise FormatError(f"{source}: message {index}: the chat template changes the assistant reply, "
                          "so its tokens cannot be found")

    def __call__(self, conv: Conversation, image_token_counts: list[int]) -> Formatted:
        """Token ids and labels; each image placeholder expanded to its number of image tokens."""
        ids: list[int] = []
        labels: list[int] = []
        for text, supervised in self.segments(conv):
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids.extend(piece)
            labels.extend(piece if supervised else [IGNORE_INDEX] * len(piece))
        return self._expand_images(ids, labels, image_token_counts, conv.source)

    def _expand_images(self, ids, labels, counts, source) -> Formatted:
        image_id = self.image_token_id
        found = ids.count(image_id)
        if found != len(counts):
            raise FormatError(f"{source}: {found} image placeholders in the formatted text but {len(counts)} "
                              "images (does a message's text contain the image token itself?)")
        if not counts:
            return Formatted(ids, labels)
        out_ids: list[int] = []
        out_labels: list[int] = []
        k = 0
        for tok, lab in zip(ids, labels, strict=True):
            if tok == image_id:
                out_ids.extend([image_id] * counts[k])
                out_labels.extend([IGNORE_INDEX] * counts[k])
                k += 1
            else:
                out_ids.append(tok)
                out_labels.append(lab)
        return Formatted(out_ids, out_labels)
