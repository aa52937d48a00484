"""The rows to evaluate: each data row's prompt (read as training reads it) with its reference answers.

The reference is the row's last assistant reply. VQA and caption rows may hold several: a list of strings, or
VQAv2's list of `{"answer": ...}` records, under the answer (caption) column. Rows without a reference (a
`messages` row that ends in a user turn; a VQA row whose answer is missing or empty) are counted and skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.images import ImageProblem, image_size
from ..errors import VlmtuneError
from ..inference.prompts import Prompt, read_prompts

REPLY_FIELD = {"vqa": "answer", "caption": "caption"}  # formats whose rows may list several references


@dataclass
class EvalRow:
    prompt: Prompt
    references: tuple[str, ...]

    @property
    def question(self) -> str:
        return self.prompt.turns[-1].text if self.prompt.turns else ""

    @property
    def source(self) -> str:
        return self.prompt.source


@dataclass
class EvalRows:
    rows: list[EvalRow]
    skipped: list[str]  # the sources of the rows with no reference answer

    def __len__(self) -> int:
        return len(self.rows)


def read_eval_rows(path, fmt: str, options: dict, image_root: str | None = None) -> EvalRows:
    """Every row of the data file with its references; VlmtuneError when no row has one, or a row is unusable."""
    from ..data.readers import llamafactory

    if fmt in REPLY_FIELD and llamafactory.reference(path) is None and Path(path).exists():
        rows, skipped = _listed_references(Path(path), fmt, options, image_root)
    else:
        rows, skipped = [], []
        for p in read_prompts(path, image_root, fmt, options):
            if p.reference is None or not p.reference.strip():
                skipped.append(p.source)
            else:
                rows.append(EvalRow(p, (p.reference,)))
    if not rows:
        raise VlmtuneError(f"no row of {path} has a reference answer to score against ({len(skipped)} row(s) "
                           "without one); evaluation needs rows that end in the expected answer")
    return EvalRows(rows, skipped)


def references_of(value) -> tuple[str, ...] | None:
    """A reply field as its references: a string, a list of strings or of `{"answer": ...}` (None: not one)."""
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if value is None:
        return ()
    if isinstance(value, list):
        out = [v.get("answer") if isinstance(v, dict) else v for v in value]
        if all(isinstance(v, str) for v in out):
            return tuple(v for v in out if v.strip())
    return None


def _listed_references(path: Path, fmt: str, options: dict, image_root: str | None):
    """VQA / caption rows read by the format's own reader, with the first reference as the reply it reads."""
    from ..data.formats import READERS
    from ..data.formatting import template_messages
    from ..data.images import ImageResolver
    from ..data.readers import sources
    from ..data.readers.common import Options, Row, RowError

    columns = dict(options.get("columns") or {})
    reply = REPLY_FIELD[fmt]
    reader = READERS[fmt]
    reader_options = Options(**({"caption_prompt": options["caption_prompt"]} if options.get("caption_prompt") else {}))
    resolve = ImageResolver(sources.base_dir(path), image_root)
    rows, skipped, problems = [], [], []
    wanted = {columns.get(f, f): f for f in reader.REQUIRED} | {src: f for f, src in columns.items()}
    for number, unit, raw in sources.rows(path, wanted):
        source = f"{path}:{number}"
        where = f"{source}: {(unit + ' ') if unit else ''}"
        try:
            if isinstance(raw, RowError):
                raise raw
            if not isinstance(raw, dict):
                raise RowError(f"expected a JSON object, got {type(raw).__name__}")
            row = Row({**raw, **{field: raw.get(col) for field, col in columns.items()}})
            row.names = columns
            refs = references_of(row.get(reply))
            if refs is None:
                raise RowError(f'"{columns.get(reply, reply)}" must be a string or a list of strings')
            if not refs:
                skipped.append(source)
                continue
            conv = reader.read(Row({**row, reply: refs[0]}), resolve, reader_options)
            *turns, _ = conv.turns
            for img in (i for t in turns for i in t.images):
                image_size(Path(img))
        except (RowError, ImageProblem) as e:
            problems.append(f"{where}{e}")
            continue
        msgs = {"messages": [{**m, "images": t.images} for m, t in zip(template_messages(conv.turns), conv.turns,
                                                                        strict=True)]}
        rows.append(EvalRow(Prompt(turns, msgs, refs[0], source, list(conv.tools)), refs))
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise VlmtuneError(f"{len(problems)} row(s) of {path} cannot be used:\n{shown}{more}")
    return rows, skipped
