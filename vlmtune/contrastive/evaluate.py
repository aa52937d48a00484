"""recall@k of a contrastive adapter beside its base model, on the eval pairs (every caption)."""

from __future__ import annotations

from pathlib import Path

from ..errors import VlmtuneError
from .pairs import read_pairs
from .recall import pair_recall


def contrastive_recall(adapter_dir, data=None, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """{"base": recall, "adapter": recall} (keys i2t_r@k, t2i_r@k) on `data` (a caption data file; default: the
    run's data.eval as its recipe.yaml recorded it)."""
    import yaml

    from ..embedding import load_embedding_model
    from .recipe import load_contrastive_recipe

    adapter_dir = Path(adapter_dir)
    saved = load_contrastive_recipe(raw=yaml.safe_load((adapter_dir / "recipe.yaml").read_text()), check_paths=False)
    data_cfg = saved.recipe.data
    path = data or data_cfg.eval
    if not path:
        raise VlmtuneError(f"{adapter_dir}'s recipe has no data.eval; give the caption data to evaluate on")
    pairs = read_pairs(path, data_cfg)
    model, processor, _ = load_embedding_model(adapter_dir)
    adapter = pair_recall(model, processor, pairs, batch_size)
    with model.disable_adapter():
        base = pair_recall(model, processor, pairs, batch_size)
    return {"base": base, "adapter": adapter}


def recall_table(result: dict[str, dict[str, float]]) -> str:
    """The base | adapter | delta table of contrastive_recall's result."""
    lines = [f"{'metric':<10} {'base':>6} {'adapter':>8} {'delta':>7}"]
    for key in result["adapter"]:
        b, a = result["base"][key], result["adapter"][key]
        lines.append(f"{key:<10} {b:>6.3f} {a:>8.3f} {a - b:>+7.3f}")
    return "\n".join(lines)
