"""Every shipped contrastive recipe (recipes/contrastive/) validates offline, and each embedding family has one at
a real size (as tests/test_config.py does for the VLM recipes in recipes/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmtune.contrastive.recipe import load_contrastive_recipe
from vlmtune.embedding import registry

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes" / "contrastive").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_contrastive_recipe_validates(path):
    cr = load_contrastive_recipe(path, check_paths=False)
    assert cr.family != "auto", f"{path.name}: set model.family (the hub is not read here)"
    family = registry.get(cr.family)
    assert cr.recipe.data.format == "caption" and cr.recipe.data.train and cr.recipe.data.eval
    assert cr.loss_for(family) == family.loss and cr.towers == "both"
    assert cr.recipe.train.eval_steps, "recall@k during training needs train.eval_steps"


def test_every_embedding_family_has_a_recipe_at_a_real_size():
    real = {load_contrastive_recipe(p, check_paths=False).family for p in RECIPES}
    assert real == set(registry.names())
