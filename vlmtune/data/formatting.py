"""Conversation -> input_ids and labels, built together from the model's own chat template.

The template is the source of truth for the layout. For each assistant turn the prompt up to
it is rendered with the generation prompt, then the conversation including it; the difference
is the reply, its end-of-turn token and any trailing text. The whole text is then tokenized at
once, exactly as the processor tokenizes it, and each token takes the label of its piece, so a
reply starts on a token boundary as it does when the model generates after the generation prompt.
Where a token would straddle two differently labelled pieces, each piece is tokenized on its own.
An EOS the family appends after a reply is inserted as a token, never as text.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

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
    """Typed-content messages as chat templates expect them (images and videos as bare `{"type": ...}` parts)."""
    out = []
    for turn in turns:
        content = [{"type": p.type} if p.type in ("image", "video") else {"type": "text", "text": p.text}
                   for p in turn.parts]
        out.append({"role": turn.role, "content": content})
    return out


@dataclass(frozen=True)
class Piece:
    """A run of rendered template text; `eos_after`: the tokenizer's EOS token follows it (same label)."""

    text: str
    supervised: bool
    eos_after: bool = False


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """Ids the tokenizer adds before and after any text (Llama's BOS), as the processor's own output has them."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for at in range(len(full) - len(plain) + 1):
        if full[at:at + len(plain)] == plain:
            return full[:at], full[at + len(plain):]
    return [], []


_ANCHOR = "\n"  # tokenized before a piece so that it is tokenized as a continuation, not a text start


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
        self.video_token_id = vocab.get(family.video_token) if family.video_token else None
        self.end_of_turn = "".join(family.end_of_turn)
        self.eos_token = self.tokenizer.eos_token or ""
        if family.append_eos_after_reply and self.tokenizer.eos_token_id is None:
            raise FormatError(f"family {family.name} appends the tokenizer's EOS after each reply, "
                              "but the tokenizer has no eos_token")
        self.affixes = special_affixes(self.tokenizer)
        self._renders_tools: bool | None = None  # found on the first row with tools: a template renders them or not

    def render(self, turns: list[Turn], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
        import jinja2

        try:
            return self.processor.apply_chat_template(template_messages(turns), tools=tools or None, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:
            raise FormatError(f"the chat template refuses this conversation: {e}") from None

    def with_system_prompt(self, conv: Conversation) -> list[Turn]:
        turns = list(conv.turns)
        if self.system_prompt is not None and (not turns or turns[0].role != "system"):
            from .conversation import Part

            turns.insert(0, Turn(role="system", parts=[Part(type="text", text=self.system_prompt)]))
        return turns

    def segments(self, conv: Conversation) -> list[tuple[str, bool]]:
        """(text, supervised) pieces whose concatenation is the rendered template text (appended EOS excluded)."""
        return [(p.text, p.supervised) for p in self.pieces(conv)]

    def pieces(self, conv: Conversation) -> list[Piece]:
        """The rendered conversation cut into prompt, reply, end-token and trailing pieces, in order."""
        turns = self.with_system_prompt(conv)
        tools = self._tools(conv, turns)
        selected = self._selected_replies(turns)
        pieces: list[Piece] = []
        done = ""
        for i, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            if i == 0:  # the template would be asked to render an empty prompt
                raise FormatError(f"{conv.source}: message 0: the conversation starts with an assistant reply; "
                                  "it must start with a user message")
            prompt = self.render(turns[:i], add_generation_prompt=True, tools=tools)
            full = self.render(turns[: i + 1], add_generation_prompt=False, tools=tools)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise FormatError(f"{conv.source}: the chat template does not render turn {i} as a continuation "
                                  "of the turns before it, so the reply cannot be located")
            reply, tail = self._split_reply(full[len(prompt):], turn.text, conv.source, i)
            train = i in selected
            # The template's own end token right after the reply is supervised; failing that, the family
            # may have the tokenizer's EOS appended (LLaVA-1.5's template ends a reply with a space only).
            end = next((e for e in (self.end_of_turn, self.eos_token) if e and tail.startswith(e)), "")
            pieces.append(Piece(prompt[len(done):], False))
            pieces.append(Piece(reply, train, eos_after=not end and self.family.append_eos_after_reply))
            pieces.append(Piece(end, train))
            pieces.append(Piece(tail[len(end):], False))
            done = full
        rest = self.render(turns, add_generation_prompt=False, tools=tools)
        pieces.append(Piece(rest[len(done):], False))
        if self.train_on is TrainOn.ALL:
            pieces = [replace(p, supervised=True) for p in pieces]
        return [p for p in pieces if p.text or p.eos_after]

    def _tools(self, conv: Conversation, turns: list[Turn]) -> list[dict] | None:
        """The row's tool definitions, or FormatError where this chat template would silently drop them."""
        if not conv.tools:
            return None
        if self._renders_tools is None:
            self._renders_tools = self.render(turns, False, conv.tools) != self.render(turns, False)
        if not self._renders_tools:
            raise FormatError(f'{conv.source}: the row gives "tools", but the chat template of this model (family '
                              f"{self.family.name}) does not render tools, so they would be lost; remove \"tools\" "
                              "from the row, or train a model whose chat template renders them")
        return conv.tools

    def _selected_replies(self, turns: list[Turn]) -> set[int]:
        replies = [i for i, t in enumerate(turns) if t.role == "assistant" and t.train]
        if self.train_on is TrainOn.LAST_ASSISTANT:
            last = max(i for i, t in enumerate(turns) if t.role == "assistant")
            return {last} & set(replies)
        return set(replies)

    def _split_reply(self, rendered: str, text: str, source: str, index: int) -> tuple[str, str]:
        """(reply, rest): the reply verbatim with any whitespace the template puts before it, else stripped."""
        lead = len(rendered) - len(rendered.lstrip())
        for at in range(lead + 1):
            if rendered.startswith(text, at):
                return rendered[: at + len(text)], rendered[at + len(text):]
        stripped = text.strip()
        at = rendered.find(stripped)
        if stripped and at >= 0 and not rendered[:at].strip():
            return rendered[: at + len(stripped)], rendered[at + len(stripped):]
        raise FormatError(f"{source}: message {index}: the chat template changes the assistant reply, "
                          "so its tokens cannot be found")

    def __call__(self, conv: Conversation, image_token_counts: list[int],
                 video_token_counts: list[int] = ()) -> Formatted:
        """Token ids and labels; each image (video) placeholder expanded to its number of image (video) tokens."""
        if conv.videos and self.video_token_id is None:
            raise FormatError(f"{conv.source}: this model family ({self.family.name}) does not take video")
        pieces = self.pieces(conv)
        per_piece = self._tokenize_whole(pieces)
        if per_piece is None:
            per_piece = [self._tokenize_piece(p.text, first=k == 0) for k, p in enumerate(pieces)]
        every = self.train_on is TrainOn.ALL
        prefix, suffix = self.affixes
        bos = self.tokenizer.bos_token
        if prefix and bos and pieces and pieces[0].text.startswith(bos):
            prefix = []  # the template writes BOS itself; the processor then adds none either
        ids, labels = list(prefix), list(prefix) if every else [IGNORE_INDEX] * len(prefix)
        for piece, piece_ids in zip(pieces, per_piece, strict=True):
            piece_ids = piece_ids + ([self.tokenizer.eos_token_id] if piece.eos_after else [])
            ids.extend(piece_ids)
            labels.extend(piece_ids if piece.supervised else [IGNORE_INDEX] * len(piece_ids))
        ids.extend(suffix)
        labels.extend(suffix if every else [IGNORE_INDEX] * len(suffix))
        return self._expand_images(ids, labels, list(image_token_counts), conv.source, list(video_token_counts))

    def _tokenize_whole(self, pieces: list[Piece]) -> list[list[int]] | None:
        """Each piece's ids from one tokenization of the whole text; None if a token straddles a label change."""
        enc = self.tokenizer("".join(p.text for p in pieces), add_special_tokens=False, return_offsets_mapping=True)
        ends = list(itertools.accumulate(len(p.text) for p in pieces))
        # a boundary matters where the label changes or an EOS goes in
        hard = [a.eos_after or a.supervised != b.supervised for a, b in itertools.pairwise(pieces)]
        out: list[list[int]] = [[] for _ in pieces]
        k = 0
        for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            while k < len(pieces) - 1 and start >= ends[k]:
                k += 1
            j = k
            while j < len(pieces) - 1 and end > ends[j]:
                j += 1
            if any(hard[k:j]):
                return None
            out[k].append(tok)
        return out

    def _tokenize_piece(self, text: str, first: bool) -> list[int]:
        """One piece's ids as a continuation of the text before it (no prefix space a text start gets)."""
        if first or not text:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        enc = self.tokenizer(_ANCHOR + text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        cut = next((i for i, (start, _) in enumerate(offsets) if start >= len(_ANCHOR)), len(ids))
        if all(end <= len(_ANCHOR) for _, end in offsets[:cut]):
            return ids[cut:]
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _expand_images(self, ids, labels, counts, source, video_counts=()) -> Formatted:
        """Each placeholder -> its run of tokens, never labels (under every masking strategy)."""
        runs = {self.image_token_id: ("image", iter(counts), len(counts))}
        if self.video_token_id is not None:
            runs[self.video_token_id] = ("video", iter(video_counts), len(video_counts))
        for tok, (kind, _, expected) in runs.items():
            found = ids.count(tok)
            if found != expected:
                raise FormatError(f"{source}: {found} {kind} placeholders in the formatted text but {expected} "
                                  f"{kind}s (does a message's text contain the {kind} token itself?)")
        if not counts and not video_counts:
            return Formatted(ids, labels)
        out_ids: list[int] = []
        out_labels: list[int] = []
        for tok, lab in zip(ids, labels, strict=True):
            if tok in runs:
                n = next(runs[tok][1])
                out_ids.extend([tok] * n)
                out_labels.extend([IGNORE_INDEX] * n)
            else:
                out_ids.append(tok)
                out_labels.append(lab)
        return Formatted(out_ids, out_labels)
