"""recall@k of a dual encoder on caption pairs (every caption): `vlmtune contrastive recall` and `vlmtune eval` on a
contrastive adapter, its merged model, or any CLIP / SigLIP model, beside its base, another dual encoder, or alone.

Reached through contrastive/entry.py (the method's run layer); a run's saved recipe.yaml is read as plain YAML
(its data section only), not loaded as a recipe."""

from __future__ import annotations

import gc
import re
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import VlmtuneError
from .pairs import read_pairs
from .recall import KS, pair_ranks, recall_from_ranks, recall_intervals

RECALL_NAME = re.compile(r"recall@([1-9][0-9]*)")
CONFIDENCE = 0.95


def _saved_data(folder: Path) -> dict:
    """The run's data section as its recipe.yaml recorded it ({} for a merged folder, which has none)."""
    import yaml

    if not (folder / "recipe.yaml").exists():
        return {}
    try:
        saved = yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise VlmtuneError(f"{folder} holds no readable recipe.yaml ({e}); give the folder a contrastive run "
                           "wrote (its output_dir)") from None
    return saved.get("data") or {}


def contrastive_recall(adapter_dir, data=None, batch_size: int = 64,
                       image_root: str | None = None) -> dict[str, dict[str, float]]:
    """{"base": recall, "adapter": recall} (keys i2t_r@k, t2i_r@k) on `data` (a caption data file; default: the
    run's data.eval as its recipe.yaml recorded it). A merged model folder is compared with the base it names."""
    folder = Path(adapter_dir)
    systems = _systems(folder, "base", None)
    ranks = _ranks(systems, _pairs(folder, data, image_root), batch_size)
    return {"base": recall_from_ranks(ranks[systems[0].name]), "adapter": recall_from_ranks(ranks[systems[1].name])}


def _pairs(folder: Path, data, image_root: str | None):
    """The pairs of `data` (read with the run's data settings), else of the run's data.eval."""
    settings = _saved_data(folder)
    if data is not None:  # a file given here: its relative image paths are its own (or image_root's)
        settings = {**settings, "image_root": image_root}
    path = data or settings.get("eval")
    if not path:
        raise VlmtuneError(f"{folder} records no data.eval (only a contrastive run's folder keeps its recipe.yaml); "
                           "give the caption data to evaluate on (--data)")
    return read_pairs(path, settings)


@dataclass(frozen=True)
class System:
    name: str  # base | against | adapter | model
    ref: str  # the model, adapter or base it loads
    bare_base: bool = False  # the adapter's own PeftModel with the adapter disabled (no second load)
    base: str | None = None  # --base: the base an adapter loads on


def recorded_base(folder: Path, base: str | None = None) -> str | None:
    """The base model an adapter (`base` overrides it) or a merged contrastive folder was tuned from; None for a
    model that records none."""
    from ..embedding import is_adapter
    from ..embedding.load import adapter_base
    from ..run_metadata import read_metadata

    if is_adapter(folder):
        return base or adapter_base(folder)
    meta = read_metadata(folder) if folder.is_dir() else {}
    return meta.get("base_path") or meta.get("base_model")


def _systems(folder: Path, against: str | None, base: str | None) -> tuple[System, ...]:
    """What is compared, first system first (the one the deltas are measured from); refused before any load."""
    from ..embedding import dual_encoder_family, is_adapter

    adapter = is_adapter(folder)
    mine = System("adapter" if adapter else "model", str(folder), base=base)
    origin = recorded_base(folder, base)
    against = against or ("base" if origin else "none")
    if against == "none":
        return (mine,)
    if against == "base":
        if origin is None:
            raise VlmtuneError(f"--against base compares a tuned model with the base it was tuned from, but {folder} "
                               "records none (no adapter_config.json, no base_model in vlmtune.json); use --against "
                               "none to score it alone, or --against PATH to compare it with another dual encoder")
        return System("base", origin, bare_base=adapter), mine
    if dual_encoder_family(against) is None:
        raise VlmtuneError(f"--against {against} is not a dual encoder that can be found here (a CLIP / SigLIP model "
                           "folder, builtin:tiny-clip / builtin:tiny-siglip, or a contrastive adapter folder); give "
                           "one of those, base, or none")
    return System("against", against), mine


def _ranks(systems: tuple[System, ...], pairs, batch_size: int, dtype=None, progress: bool = False) -> dict:
    """Each system's query ranks (recall.query_ranks) on the pairs; one model in memory at a time."""
    from ..embedding import load_embedding_model
    from ..index.build import default_device

    device, ranks = default_device(), {}
    mine = systems[-1]
    model, processor, _ = load_embedding_model(mine.ref, dtype=dtype, device=device, base=mine.base)
    ranks[mine.name] = pair_ranks(model, processor, pairs, batch_size, progress)
    if len(systems) == 2 and systems[0].bare_base:
        with model.disable_adapter():
            ranks[systems[0].name] = pair_ranks(model, processor, pairs, batch_size, progress)
    elif len(systems) == 2:
        del model
        gc.collect()
        model, processor, _ = load_embedding_model(systems[0].ref, dtype=dtype, device=device)
        ranks[systems[0].name] = pair_ranks(model, processor, pairs, batch_size, progress)
    return ranks


def recall_ks(metrics) -> tuple[int, ...]:
    """The k of each --metric recall@K (auto: 1, 5 and 10); anything else refused with the names that work."""
    names = [metrics] if isinstance(metrics, str) else list(metrics or ["auto"])
    bad = [n for n in names if n != "auto" and not RECALL_NAME.fullmatch(str(n))]
    if bad:
        raise VlmtuneError(f"--metric {', '.join(map(str, bad))}: a dual encoder is scored by retrieval recall; the "
                           "metrics are recall@K for any K >= 1, e.g. recall@1, recall@5, recall@10 (the default, "
                           "auto, is those three)")
    ks = {k for n in names for k in (KS if n == "auto" else (int(RECALL_NAME.fullmatch(n).group(1)),))}
    return tuple(sorted(ks))


def refuse_options(model: Path, data_format: str | None, max_new_tokens: int | None, base: str | None) -> None:
    """The options of `vlmtune eval` a dual encoder has no use for, when they were given."""
    from ..embedding import is_adapter

    if data_format not in (None, "caption"):
        raise VlmtuneError(f"--format {data_format}: a dual encoder is evaluated on caption rows (an image and its "
                           "caption, or a list of captions, per row; data.columns maps your columns); drop --format "
                           "or give --format caption with such a file")
    if max_new_tokens is not None:
        raise VlmtuneError(f"--max-new-tokens does not apply to {model}: a dual encoder generates no text (it ranks "
                           "images and captions); remove it")
    if base is not None and not is_adapter(model):
        raise VlmtuneError(f"--base names the base model an adapter loads on, but {model} is a full model (no "
                           "adapter_config.json); remove --base, or compare with another model by --against PATH")


def recall_table(recall: dict[str, dict[str, float]], intervals: dict[str, list[float]] | None = None) -> str:
    """One line per recall key: each system's value, and with two systems the delta (second - first) and, when
    given, its 95% interval."""
    names = list(recall)
    head = f"{'metric':<10}" + "".join(f" {n:>8}" for n in names)
    if len(names) == 2:
        head += f" {'delta':>7}" + ("  95% CI" if intervals else "")
    lines = [head]
    for key in recall[names[-1]]:
        line = f"{key:<10}" + "".join(f" {recall[n][key]:>8.3f}" for n in names)
        if len(names) == 2:
            line += f" {recall[names[1]][key] - recall[names[0]][key]:>+7.3f}"
            if intervals:
                low, high = intervals[key]
                line += f"  [{low:+.3f}, {high:+.3f}]"
        lines.append(line)
    return "\n".join(lines)


@dataclass
class RecallResult:
    """`vlmtune eval` of a dual encoder: summary (what summary.json holds) and the recall table."""

    summary: dict

    def render(self) -> str:
        s = self.summary
        head = f"image<->text retrieval on {s['data']} ({s['pairs']} images, {s['captions']} captions)"
        intervals = {k: v["ci95"] for k, v in s.get("intervals", {}).items()}
        return head + "\n" + recall_table(s["recall"], intervals)

    def _repr_pretty_(self, p, cycle):
        p.text(self.render())


def evaluate_recall(model, data, *, batch_size: int | None = None, out=None, overwrite: bool = False,
                    image_root: str | None = None, log=print, metrics=("auto",), against: str | None = None,
                    base: str | None = None, seed: int = 0, bootstrap: int = 1000, dtype: str | None = None,
                    progress: bool = False, data_format: str | None = None,
                    max_new_tokens: int | None = None) -> RecallResult:
    """recall@k (`metrics`: recall@K names) of `model` on the caption file `data` (default: a run's data.eval)
    beside `against`: base (the default where a base is recorded: an adapter's, with the adapter disabled, or a
    merged folder's), another dual encoder's folder / adapter, or none. Two systems: the `bootstrap`-resample 95%
    interval (seeded by `seed`) of each difference. `out`: summary.json and one record per system there."""
    from ..evaluation.outputs import MARK, check_out, write_outputs
    from ..inference.load import dtype_named

    folder = Path(str(model))
    refuse_options(folder, data_format, max_new_tokens, base)
    ks = recall_ks(metrics)
    if bootstrap <= 0:
        raise VlmtuneError(f"--bootstrap must be a positive number of resamples, got {bootstrap}")
    out = Path(out) if out is not None else None
    if out is not None:
        check_out(out, overwrite)
    systems = _systems(folder, against, base)
    pairs = _pairs(folder, data, image_root)
    ranks = _ranks(systems, pairs, batch_size or 64, dtype_named(dtype), progress)
    recall = {s.name: recall_from_ranks(ranks[s.name], ks) for s in systems}
    summary = {MARK: 1, "vlmtune_version": __version__, "data": str(data or "the run's data.eval"),
               "method": "contrastive", "model": str(model), "pairs": len(pairs),
               "captions": sum(len(p.captions) for p in pairs), "metrics_used": [f"recall@{k}" for k in ks],
               "compared": [s.name for s in systems], "systems": {s.name: {"model": s.ref} for s in systems},
               "recall": recall}
    records = [{"system": s.name, "model": s.ref, **recall[s.name]} for s in systems]
    if len(systems) == 2:
        a, b = (s.name for s in systems)
        ci = recall_intervals(ranks[a], ranks[b], ks, resamples=bootstrap, seed=seed, confidence=CONFIDENCE)
        summary.update(seed=seed, bootstrap_resamples=bootstrap, confidence=CONFIDENCE,
                       intervals={k: {"delta": recall[b][k] - recall[a][k], "ci95": ci[k]} for k in ci})
        records[1]["ci95"] = ci
    if out is not None:
        write_outputs(out, records, summary)
        log(f"wrote {out / 'summary.json'}")
    return RecallResult(summary)
