"""recall@k of a contrastive adapter (or its merged model) beside its base model, on caption pairs (every caption):
`vlmtune contrastive recall` and `vlmtune eval` on a folder a contrastive run wrote.

Reached from the method registry (methods/contrastive.py): it reads the run's saved recipe.yaml as plain YAML and
imports nothing from vlmtune.config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import VlmtuneError
from .pairs import read_pairs
from .recall import pair_recall


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
    return _side_by_side(folder, _pairs(folder, data, image_root), batch_size)


def _pairs(folder: Path, data, image_root: str | None):
    """The pairs of `data` (read with the run's data settings), else of the run's data.eval."""
    settings = _saved_data(folder)
    if data is not None:  # a file given here: its relative image paths are its own (or image_root's)
        settings = {**settings, "image_root": image_root}
    path = data or settings.get("eval")
    if not path:
        raise VlmtuneError(f"{folder} records no data.eval (a merged folder keeps no recipe.yaml); give the caption "
                           "data to evaluate on (--data)")
    return read_pairs(path, settings)


def _side_by_side(folder: Path, pairs, batch_size: int) -> dict[str, dict[str, float]]:
    from ..embedding import is_adapter, load_embedding_model
    from ..run_metadata import read_metadata

    model, processor, _ = load_embedding_model(folder)
    adapter = pair_recall(model, processor, pairs, batch_size)
    if is_adapter(folder):
        with model.disable_adapter():
            base = pair_recall(model, processor, pairs, batch_size)
        return {"base": base, "adapter": adapter}
    meta = read_metadata(folder)  # a merged model: its recorded base, loaded after it
    name = meta.get("base_path") or meta.get("base_model")
    if not name:
        raise VlmtuneError(f"{folder}/vlmtune.json names no base model (base_model); give an adapter folder")
    del model
    base_model, base_processor, _ = load_embedding_model(name)
    return {"base": pair_recall(base_model, base_processor, pairs, batch_size), "adapter": adapter}


def recall_table(result: dict[str, dict[str, float]]) -> str:
    """The base | adapter | delta table of contrastive_recall's result."""
    lines = [f"{'metric':<10} {'base':>6} {'adapter':>8} {'delta':>7}"]
    for key in result["adapter"]:
        b, a = result["base"][key], result["adapter"][key]
        lines.append(f"{key:<10} {b:>6.3f} {a:>8.3f} {a - b:>+7.3f}")
    return "\n".join(lines)


@dataclass
class RecallResult:
    """`vlmtune eval` of a contrastive folder: summary (what summary.json holds) and the recall table."""

    summary: dict

    def render(self) -> str:
        s = self.summary
        head = f"image<->text retrieval on {s['data']} ({s['pairs']} images, {s['captions']} captions)"
        return head + "\n" + recall_table(s["recall"])

    def _repr_pretty_(self, p, cycle):
        p.text(self.render())


def evaluate_recall(model, data, *, batch_size: int = 64, out=None, overwrite: bool = False,
                    image_root: str | None = None, log=print, **ignored) -> RecallResult:
    """contrastive_recall on `data`, with its counts; `out`: summary.json and one record per system there.
    `ignored`: evaluation.run.evaluate's other options, which do not apply here yet."""
    from ..evaluation.outputs import MARK, check_out, write_outputs

    out = Path(out) if out is not None else None
    if out is not None:
        check_out(out, overwrite)
    pairs = _pairs(Path(model), data, image_root)
    recall = _side_by_side(Path(model), pairs, batch_size)
    summary = {MARK: 1, "vlmtune_version": __version__, "data": str(data or "the run's data.eval"), "method": "contrastive",
               "model": str(model), "pairs": len(pairs), "captions": sum(len(p.captions) for p in pairs),
               "compared": ["base", "adapter"], "recall": recall}
    if out is not None:
        write_outputs(out, [{"system": name, **values} for name, values in recall.items()], summary)
        log(f"wrote {out / 'summary.json'}")
    return RecallResult(summary)
