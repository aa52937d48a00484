"""`vlmtune eval`: score a model or adapter on a data file, against its base, another model, or alone.

Everything that can be wrong is found before any weights load: the metrics, the --out folder, the rows (those
without a reference are counted and skipped), the references each metric can score, the models' families.
"""

from __future__ import annotations

import gc
from importlib import import_module
from pathlib import Path

from .. import __version__
from ..errors import VlmtuneError
from ..inference.load import dtype_named, load_for_inference
from ..inference.prompts import data_settings
from ..metrics import resolve_metrics
from .outputs import MARK, check_out, write_outputs
from .report import EvalResult, mover_records, row_records, score_one, score_two
from .rows import read_eval_rows
from .systems import check_against, describe, replies


def evaluate(model, data, *, metrics=("auto",), against: str | None = None, out=None, overwrite: bool = False,
             data_format: str | None = None, image_root: str | None = None, base: str | None = None,
             batch_size: int | None = None, max_new_tokens: int | None = None, seed: int = 0,
             bootstrap: int = 1000, dtype: str | None = None, progress: bool = True, log=print) -> EvalResult:
    """Generate for every row of `data` with `model` (and what it is compared with), score, and write `out`.

    against: "base" (the default for an adapter: its bare base, in the same run), a model/adapter path, or
    "none" (the default for a full model). Returns an EvalResult (`.summary`, `.records`, `.render()`).
    A dual encoder (a model an own-run method trains) is evaluated by that method (recall@k for contrastive);
    batch_size and max_new_tokens left None take the evaluation's own defaults (8 and 64 here)."""
    if any(v is not None and v <= 0 for v in (batch_size, max_new_tokens)) or bootstrap <= 0:
        raise VlmtuneError("batch_size, max_new_tokens and bootstrap must be positive")
    method = _own_run_method(model)
    if method is not None:  # a dual encoder (a method with its own run trains it): that method's evaluation
        return import_module(method.own_run).evaluate(
            model, data, batch_size=batch_size, out=out, overwrite=overwrite, log=log, metrics=metrics, against=against,
            data_format=data_format, image_root=image_root, base=base, seed=seed, bootstrap=bootstrap, dtype=dtype,
            progress=progress, max_new_tokens=max_new_tokens)
    batch_size = 8 if batch_size is None else batch_size
    max_new_tokens = 64 if max_new_tokens is None else max_new_tokens
    names = [metrics] if isinstance(metrics, str) else list(metrics or ["auto"])
    fmt, options = data_settings(model, data_format)
    chosen = resolve_metrics(names, fmt)
    out = Path(out) if out is not None else None
    if out is not None:
        check_out(out, overwrite)
    rows = read_eval_rows(data, fmt, options, image_root)
    check_references(chosen, rows.rows)
    main = describe(model, base)
    against = against or ("base" if main.kind == "adapter" else "none")
    other = describe(against) if against not in ("base", "none") else None
    check_against(main, against, other)
    if rows.skipped:
        log(f"skipped {len(rows.skipped)} row(s) without a reference answer "
            f"(e.g. {', '.join(rows.skipped[:3])}); scoring {len(rows)}")

    run = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    mine = "adapter" if main.kind == "adapter" else "model"
    loaded = load_for_inference(model, base=base, dtype=dtype_named(dtype))
    pred_b = replies(loaded, rows.rows, desc=mine, **run)
    if against == "base":
        systems, ids = ("base", mine), {"base": main.base, mine: main.ref}
        pred_a = replies(loaded, rows.rows, desc="base", bare_base=True, **run)
    elif other is not None:
        del loaded
        gc.collect()
        systems, ids = ("against", mine), {"against": other.ref, mine: main.ref}
        pred_a = replies(load_for_inference(other.ref, dtype=dtype_named(dtype)), rows.rows, desc="against", **run)
    else:
        systems, ids = (mine,), {mine: main.ref}

    summary = {MARK: 1, "vlmtune_version": __version__, "data": str(data), "format": fmt,
               "rows_read": len(rows) + len(rows.skipped), "rows_scored": len(rows),
               "rows_skipped_no_reference": len(rows.skipped), "skipped": rows.skipped[:50],
               "metrics_used": [m.name for m in chosen], "seed": seed, "max_new_tokens": max_new_tokens,
               "systems": {name: {"model": ids[name], **({"kind": main.kind, "base": main.base, "family": main.family}
                                                          if name == mine else {})} for name in systems}}
    if len(systems) == 2:
        scores, per_row, comparisons = score_two(chosen, rows.rows, pred_a, pred_b, systems, resamples=bootstrap,
                                                 seed=seed)
        summary.update(compared=list(systems), bootstrap_resamples=bootstrap, confidence=0.95, metrics=scores,
                       moved=mover_records(_most_moved(comparisons), rows.rows, pred_a, pred_b, systems))
        records = [*row_records(rows.rows, systems[0], ids[systems[0]], pred_a,
                                {k: v[0] for k, v in per_row.items()}),
                   *row_records(rows.rows, systems[1], ids[systems[1]], pred_b, {k: v[1] for k, v in per_row.items()})]
    else:
        scores, per_row = score_one(chosen, rows.rows, pred_b)
        summary["metrics"] = scores
        records = row_records(rows.rows, mine, main.ref, pred_b, per_row)
    if out is not None:
        write_outputs(out, records, summary)
        log(f"wrote {out / 'predictions.jsonl'} and {out / 'summary.json'}")
    return EvalResult(summary, records, systems)


def _own_run_method(model):
    """The method with its own run that evaluates `model`: the one that wrote the folder (its vlmtune.json), else,
    for a dual encoder without one (a plain model folder, a builtin tiny one), the own-run method whose model
    families hold its embedding family; None for a VLM."""
    from .. import methods
    from ..embedding import dual_encoder_family
    from ..run_metadata import read_metadata

    name = read_metadata(Path(str(model))).get("method") if Path(str(model)).is_dir() else None
    method = methods.METHODS.get(name) if isinstance(name, str) else None
    if method is not None:
        return method if method.own_run else None
    family = dual_encoder_family(model)
    if family is None:
        return None
    return next((m for m in methods.METHODS.values() if m.own_run and family.name in (m.model_families() or ())),
                None)


def _most_moved(comparisons):
    """The first metric under which some row moved (the first metric when none did)."""
    return next((c for c in comparisons if c.better or c.worse), comparisons[0])


def check_references(chosen, rows) -> None:
    """Every (metric, row) whose references the metric cannot score, in one error."""
    problems = []
    for m in chosen:
        bad = [f"{r.source}: {p}" for r in rows for ref in r.references if (p := m.check_reference(ref))]
        if bad:
            shown = "\n".join(f"    - {b}" for b in bad[:10]) + (f"\n    ... and {len(bad) - 10} more"
                                                                 if len(bad) > 10 else "")
            problems.append(f"  metric {m.name} cannot score {len(bad)} reference(s):\n{shown}")
    if problems:
        raise VlmtuneError("the references do not fit the metrics (choose others with --metric):\n"
                           + "\n".join(problems))
