"""check_model: what the model choice needs, said as a recipe fix."""

from __future__ import annotations

import json

from vlmtune.config import load_recipe
from vlmtune.modeling import check_model


def model_folder(root, config: dict):
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config))
    (root / "configuration_custom.py").write_text("raise SystemExit('this code must not run')\n")
    return root


def recipe_for(folder):
    return load_recipe(None, overrides={"model.name_or_path": str(folder), "data.train": "x"}, check_paths=False)


CUSTOM = {"model_type": "custom_vlm_unknown_to_transformers", "architectures": ["CustomVLM"],
          "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}


def test_a_remote_code_model_names_trust_remote_code(tmp_path):
    errors, config, family = check_model(recipe_for(model_folder(tmp_path / "custom", CUSTOM)))
    assert config is None and family is None and [e.path for e in errors] == ["model.name_or_path"]
    assert "set model.trust_remote_code: true to load it" in errors[0].message
    assert "runs the Python code in that folder/repo" in errors[0].message
    # the same unknown model_type without code of its own is not sent to trust_remote_code
    no_code = {k: v for k, v in CUSTOM.items() if k != "auto_map"}
    errors, _, _ = check_model(recipe_for(model_folder(tmp_path / "plain", no_code)))
    assert [e.path for e in errors] == ["model.name_or_path"] and "trust_remote_code" not in errors[0].message
