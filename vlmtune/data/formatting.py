"""Conversation -> input_ids and labels, built together from the model's own chat template.

The template is the source of truth for the layout. For each assistant turn the prompt up to
it is rendered with the generation prompt, then the conversation including it; the difference
is the reply, its end-of-turn token and any trailing text. The whole text is then tokenized at
once, exactly as the processor tokenizes it, and each token takes the label of its piece, so a
reply starts on a token boundary as it does when the model generates after the generation prompt.
Where a token would straddle two differently labelled pieces, each piece is tokenized on its own.
An EOS the family appends after a reply is inserted as a token, never as text.

Images and videos: the template writes one placeholder per image; each is replaced by the text its family
planned for it (a run of pads, `<start_of_image>` + soft tokens + `<end_of_image>`, tiles with row and
column markers), as the processor replaces it, before the text is tokenized; tokens of that text are never
labels, under every masking strategy.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ..families import Family
from .conversation import Conversation, TrainOn, Turn

IGNORE_INDEX = -100


class FormatError(ValueError):
    """A conversation the chat template cannot render the way training needs."""


@dataclass
class Formatted:
    input_ids: list[int]
    labels: list[int]
    # (first token, end token, "image" | "video") of each image and video's token sequence, in order
    media: list[tuple[int, int, str]] = field(default_factory=list)

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
        if family.image_placeholder not in vocab:
            raise FormatError(f"the tokenizer has no image token {family.image_placeholder!r} (family {family.name})")
        self.placeholders = {family.image_placeholder: "image"}
        if family.video_placeholder and family.video_placeholder in vocab:
            self.placeholders[family.video_placeholder] = "video"
        self._placeholder_re = re.compile("|".join(re.escape(p) for p in sorted(self.placeholders, key=len,
                                                                                  reverse=True)))
        self.end_of_turn = family.end_of_turn  # alternatives: the first the template puts after a reply
        self.eos_token = self.tokenizer.eos_token or ""
        if family.append_eos_after_reply and self.tokenizer.eos_token_id is None:
            raise FormatError(f"family {family.name} appends the tokenizer's EOS after each reply, "
                              "but the tokenizer has no eos_token")
        self.affixes = special_affixes(self.tokenizer)
        self._renders_tools: bool | None = None  # found on the first row with tools: a template renders them or not
        # each run between label changes tokenized on its own (the prompt exactly as it is tokenized before
        # generation), so two replies to one prompt share its tokens whatever they start with
        self.split_at_labels = False

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
            end = next((e for e in (*self.end_of_turn, self.eos_token) if e and tail.startswith(e)), "")
            if not end and not self.family.append_eos_after_reply:
                ends = ", ".join(dict.fromkeys(e for e in (*self.end_of_turn, self.eos_token) if e))
                raise FormatError(f"{conv.source}: message {i}: the chat template writes none of the end tokens of "
                                  f"the {self.family.name} family ({ends}) after the reply, so the model would "
                                  "never learn to stop; use the model's own chat template")
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

    def appends_eos(self, conv: Conversation) -> bool:
        """Whether the formatter inserts the tokenizer's EOS after a reply of this conversation (the template
        ends the reply with no end token of its own)."""
        return any(p.eos_after for p in self.pieces(conv))

    def __call__(self, conv: Conversation, image_texts: Sequence[str] = (),
                 video_texts: Sequence[str] = ()) -> Formatted:
        """Token ids and labels; each image (video) placeholder replaced by its planned text (see the module doc)."""
        if conv.videos and "video" not in self.placeholders.values():
            raise FormatError(f"{conv.source}: this model family ({self.family.name}) does not take video")
        pieces, media = self._expand_media(self.pieces(conv), list(image_texts), list(video_texts), conv.source)
        per_piece = None if self.split_at_labels else self._tokenize_whole(pieces)
        if per_piece is None:
            per_piece = self._tokenize_runs(pieces)
        every = self.train_on is TrainOn.ALL
        prefix, suffix = self.affixes
        bos = self.tokenizer.bos_token
        if prefix and bos and pieces and pieces[0].text.startswith(bos):
            prefix = []  # the template writes BOS itself; the processor then adds none either
        ids, labels = list(prefix), list(prefix) if every else [IGNORE_INDEX] * len(prefix)
        spans = iter(media)
        span = next(spans, None)
        runs: list[list] = []  # [first token, end token, kind] per media span
        for piece, piece_tokens in zip(pieces, per_piece, strict=True):
            for tok, start, end in piece_tokens:
                while span is not None and span[1] <= start:
                    span = next(spans, None)
                in_media = span is not None and start < span[1] and end > span[0]
                if in_media:
                    if runs and runs[-1][3] is span:
                        runs[-1][1] = len(ids) + 1
                    else:
                        runs.append([len(ids), len(ids) + 1, span[2], span])
                ids.append(tok)
                labels.append(tok if piece.supervised and not in_media else IGNORE_INDEX)
            if piece.eos_after:
                ids.append(self.tokenizer.eos_token_id)
                labels.append(self.tokenizer.eos_token_id if piece.supervised else IGNORE_INDEX)
        ids.extend(suffix)
        labels.extend(suffix if every else [IGNORE_INDEX] * len(suffix))
        return Formatted(ids, labels, [(a, b, kind) for a, b, kind, _ in runs])

    def _expand_media(self, pieces: list[Piece], image_texts: list[str], video_texts: list[str],
                      source: str) -> tuple[list[Piece], list[tuple[int, int, str]]]:
        """Pieces with each placeholder replaced by its text, and the (start, end, kind) character span of every
        replacement in the joined text."""
        texts = {"image": image_texts, "video": video_texts}
        for kind, given in texts.items():
            found = sum(1 for p in pieces for m in self._placeholder_re.finditer(p.text)
                        if self.placeholders[m.group()] == kind)
            if found != len(given):
                raise FormatError(f"{source}: {found} {kind} placeholders in the formatted text but {len(given)} "
                                  f"{kind}s (does a message's text contain the {kind} token itself?)")
        if not image_texts and not video_texts:
            return pieces, []
        queues = {kind: iter(given) for kind, given in texts.items()}
        out, spans, offset = [], [], 0
        for piece in pieces:
            text, at = [], 0
            for m in self._placeholder_re.finditer(piece.text):
                text.append(piece.text[at:m.start()])
                start = offset + sum(len(t) for t in text)
                kind = self.placeholders[m.group()]
                replacement = next(queues[kind])
                text.append(replacement)
                spans.append((start, start + len(replacement), kind))
                at = m.end()
            text.append(piece.text[at:])
            expanded = "".join(text)
            out.append(replace(piece, text=expanded))
            offset += len(expanded)
        return out, spans

    def _tokenize_whole(self, pieces: list[Piece]) -> list[list[tuple[int, int, int]]] | None:
        """Each piece's (id, start, end) from one tokenization of the whole text; None if a token straddles a
        label change."""
        enc = self.tokenizer("".join(p.text for p in pieces), add_special_tokens=False, return_offsets_mapping=True)
        ends = list(itertools.accumulate(len(p.text) for p in pieces))
        # a boundary matters where the label changes or an EOS goes in
        hard = [a.eos_after or a.supervised != b.supervised for a, b in itertools.pairwise(pieces)]
        out: list[list[tuple[int, int, int]]] = [[] for _ in pieces]
        k = 0
        for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            while k < len(pieces) - 1 and start >= ends[k]:
                k += 1
            j = k
            while j < len(pieces) - 1 and end > ends[j]:
                j += 1
            if any(hard[k:j]):
                return None
            out[k].append((tok, start, end))
        return out

    def _tokenize_runs(self, pieces: list[Piece]) -> list[list[tuple[int, int, int]]]:
        """Each piece's (id, start, end), tokenizing separately only where the label changes or an EOS goes in:
        each run of pieces between such boundaries is tokenized at once, as a continuation of the text before."""
        out: list[list[tuple[int, int, int]]] = [[] for _ in pieces]
        first, offset = 0, 0
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            if not last and not (piece.eos_after or piece.supervised != pieces[k + 1].supervised):
                continue
            run = pieces[first:k + 1]
            ends = list(itertools.accumulate(len(p.text) for p in run))
            j = 0
            for tok, start, end in self._tokenize_piece("".join(p.text for p in run), first=first == 0):
                while j < len(run) - 1 and start >= ends[j]:
                    j += 1
                out[first + j].append((tok, start + offset, end + offset))
            offset += ends[-1]
            first = k + 1
        return out

    def _tokenize_piece(self, text: str, first: bool) -> list[tuple[int, int, int]]:
        """One piece's (id, start, end) as a continuation of the text before it (no prefix space a text start gets)."""
        if first or not text:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return [(i, a, b) for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]
        enc = self.tokenizer(_ANCHOR + text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        cut = next((i for i, (start, _) in enumerate(offsets) if start >= len(_ANCHOR)), len(ids))
        if all(end <= len(_ANCHOR) for _, end in offsets[:cut]):
            n = len(_ANCHOR)
            return [(i, max(a - n, 0), max(b - n, 0)) for i, (a, b) in zip(ids[cut:], offsets[cut:], strict=True)]
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [(i, a, b) for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]
