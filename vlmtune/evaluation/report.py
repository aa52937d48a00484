"""Scores, per-row records, the summary and the printed table of an evaluation.

Two systems: each metric's paired bootstrap (metrics.compare) gives a, b, the CI of b - a and the rows that
moved; the first metric's movers are the rows shown. One system: each metric's scores alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..metrics import Metric, Sample, compare

SHOWN_ROWS = 3  # rows that got better / worse, each
EMPTY = "(empty reply)"


@dataclass
class EvalResult:
    summary: dict  # what summary.json holds
    records: list[dict]  # what predictions.jsonl holds: one per row and system
    systems: tuple[str, ...]  # ("base", "adapter"), ("against", "model"), or one name

    def render(self) -> str:
        lines = table(self.summary, self.systems)
        if len(self.systems) == 2:
            lines += movers_text(self.summary, self.systems)
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle):  # IPython shows the table
        p.text(self.render())


def samples(rows, predictions: list[str]) -> list[Sample]:
    return [Sample(pred, r.references, r.question) for r, pred in zip(rows, predictions, strict=True)]


def score_one(metrics: list[Metric], rows, predictions: list[str]) -> tuple[dict, dict[str, list[float]]]:
    """({metric: {key: value}}, {metric: row scores})."""
    summary, per_row = {}, {}
    for m in metrics:
        s = m.score(samples(rows, predictions))
        summary[m.name], per_row[m.name] = s.summary, s.rows
    return summary, per_row


def score_two(metrics: list[Metric], rows, pred_a: list[str], pred_b: list[str], names: tuple[str, str], *,
              resamples: int, seed: int):
    """({metric: {key: {a, b, delta, ci95}}}, {metric: (rows a, rows b)}, comparisons)."""
    a, b = names
    summary, per_row, comparisons = {}, {}, []
    for m in metrics:
        c = compare(m, samples(rows, pred_a), samples(rows, pred_b), resamples=resamples, seed=seed, k=SHOWN_ROWS)
        summary[m.name] = {d.key: {a: d.a, b: d.b, "delta": d.delta, "ci95": [d.low, d.high]} for d in c.differences}
        per_row[m.name] = (c.rows_a, c.rows_b)
        comparisons.append(c)
    return summary, per_row, comparisons


def mover_records(comparison, rows, pred_a, pred_b, names) -> dict[str, list[dict]]:
    a, b = names

    def record(m):
        r = rows[m.row]
        return {"source": r.source, "images": r.prompt.images, "question": r.question,
                "references": list(r.references), a: pred_a[m.row], b: pred_b[m.row],
                f"{a}_score": m.a, f"{b}_score": m.b}

    return {"metric": comparison.metric, "better": [record(m) for m in comparison.better],
            "worse": [record(m) for m in comparison.worse]}


def row_records(rows, system: str, model: str, predictions: list[str], scores: dict[str, list[float]]) -> list[dict]:
    return [{"index": i, "source": r.source, "system": system, "model": model, "images": r.prompt.images,
             "question": r.question, "references": list(r.references), "prediction": pred,
             "scores": {name: s[i] for name, s in scores.items()}}
            for i, (r, pred) in enumerate(zip(rows, predictions, strict=True))]


def _num(x: float) -> str:
    return f"{x:.3f}"


def table(summary: dict, systems: tuple[str, ...]) -> list[str]:
    """`metric | base | adapter | Δ (95% CI)` (or `metric | score`), one line per summary number."""
    if len(systems) == 2:
        a, b = systems
        head = ["metric", a, b, "Δ (95% CI)"]
        body = [[key, _num(v[a]), _num(v[b]), f"{v['delta']:+.3f} ({v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f})"]
                for keys in summary["metrics"].values() for key, v in keys.items()]
    else:
        head = ["metric", systems[0]]
        body = [[key, _num(v)] for keys in summary["metrics"].values() for key, v in keys.items()]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt = [lambda s, w=w: s.ljust(w) for w in widths[:1]] + [lambda s, w=w: s.rjust(w) for w in widths[1:]]
    lines = [" | ".join(f(c) for f, c in zip(fmt, row, strict=True)) for row in [head, *body]]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return lines


def movers_text(summary: dict, systems: tuple[str, str]) -> list[str]:
    a, b = systems
    moved = summary.get("moved") or {}
    lines = []
    for label in ("better", "worse"):
        found = moved.get(label) or []
        lines.append(f"\nrows that got {label} ({moved.get('metric')}): {len(found) or 'none'}")
        for m in found:
            images = ", ".join(m["images"]) or "no image"
            lines += [f"  {m['source']}  [{images}]", f"    question:  {m['question']}",
                      f"    reference: {' | '.join(m['references'])}",
                      f"    {a} ({m[f'{a}_score']:.2f}): {m[a] or EMPTY}",
                      f"    {b} ({m[f'{b}_score']:.2f}): {m[b] or EMPTY}"]
    return lines
