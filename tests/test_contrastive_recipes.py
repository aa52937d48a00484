"""The shipped contrastive recipes (recipes/*.yaml with method: contrastive, validated with every other recipe by
tests/test_config.py through the method registry) train each family with its own loss and evaluate recall@k."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlmtune.config import load_recipe
from vlmtune.contrastive.train import loss_for
from vlmtune.embedding import registry

RECIPES = [p for p in sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
           if (yaml.safe_load(p.read_text()) or {}).get("method") == "contrastive"]


def test_there_are_contrastive_recipes():
    assert len(RECIPES) >= len(registry.names())


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_contrastive_recipe_uses_its_familys_loss_and_evaluates(path):
    r = load_recipe(path, check_paths=False)
    family = registry.get(r.model.family)
    assert r.data.format == "caption" and r.data.train and r.data.eval
    assert loss_for(r, family) == family.loss and r.lora.towers == "both"
    assert r.train.eval_steps, "recall@k during training needs train.eval_steps"
