"""A corrupt, incomplete or mismatched adapter is a clear error in merge and predict, before any work starts;
non-finite values never pass the parity check or reach a merged folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vlmtune
from vlmtune.demo import builtin_model_path

from .test_merge import QUIET, copy_adapter, make_adapter, run, trained_adapter  # noqa: F401 (fixture)

WEIGHTS = "adapter_model.safetensors"


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")  # the tensor bytes begin after the header
    if how == "overwritten":  # 0xFF bytes are NaN as float32 (and bfloat16)
        data = data[:start] + b"\xff" * 4096 + data[start + 4096:]
    elif how == "truncated":
        data = data[:len(data) // 2]
    else:
        data = b"this is not a safetensors file " * 8
    path.write_bytes(data)


def command(name: str, adapter: Path, tmp_path: Path) -> list:
    if name == "merge":
        return ["merge-adapter", adapter, "--out", tmp_path / "merged"]
    return ["predict", adapter, "--prompt", "What is it?", "--max-new-tokens", "4"]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Call it once the adapter is ready: from then on loading any model fails the test (errors come first)."""
    from transformers import AutoModelForImageTextToText

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the adapter was checked")

    return lambda: monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", refuse)


@pytest.mark.parametrize("how, expected", [
    ("overwritten", "adapter values are NaN or infinite"),  # issue 8: merged into 61,054 NaN weights, exit 0
    ("truncated", "is not a readable adapter file"),
    ("garbage", "is not a readable adapter file"),
])
@pytest.mark.parametrize("name", ["merge", "predict"])
def test_a_corrupt_adapter_file_is_a_clear_error(trained_adapter, tmp_path, capsys, no_model_loading,  # noqa: F811
                                                 name, how, expected):
    adapter = copy_adapter(trained_adapter("qwen2_vl"), tmp_path / "adapter")
    corrupt(adapter / WEIGHTS, how)
    no_model_loading()
    code, _, err = run(capsys, *command(name, adapter, tmp_path))
    assert code == 2 and "Traceback" not in err and "SafetensorError" not in err, err
    assert f"{adapter / WEIGHTS}" in err and expected in err and "re-train the adapter, or copy" in err
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("name", ["merge", "predict"])
def test_weights_of_another_rank_than_the_config_are_refused(trained_adapter, tmp_path, capsys,  # noqa: F811
                                                             no_model_loading, name):
    adapter = copy_adapter(trained_adapter("qwen2_vl"), tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] += 4
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    no_model_loading()
    code, _, err = run(capsys, *command(name, adapter, tmp_path))
    assert code == 2 and "Traceback" not in err, err
    assert f"but adapter_config.json says {config['r']}" in err and str(adapter / WEIGHTS) in err


def test_predict_with_an_adapter_folder_without_its_weights(trained_adapter, tmp_path, capsys,  # noqa: F811
                                                            no_model_loading):
    adapter = copy_adapter(trained_adapter("qwen2_vl"), tmp_path / "adapter")
    (adapter / WEIGHTS).unlink()
    no_model_loading()
    code, _, err = run(capsys, *command("predict", adapter, tmp_path))
    assert code == 2 and "Traceback" not in err, err
    assert f"the adapter folder {adapter} has no {WEIGHTS}" in err


def test_predict_refuses_a_base_of_another_family(trained_adapter, tmp_path, capsys, no_model_loading):  # noqa: F811
    adapter = trained_adapter("qwen2_vl")
    no_model_loading()
    code, _, err = run(capsys, *command("predict", adapter, tmp_path), "--base", "builtin:tiny-llava")
    assert code == 2 and "Traceback" not in err, err
    assert "is a llava model but the adapter was trained on the qwen2_vl family" in err


def test_the_parity_check_fails_on_non_finite_logits(trained_adapter, tmp_path):  # noqa: F811
    """NaN compares as neither above nor below the tolerance: a merged folder with a NaN weight once passed."""
    from safetensors.torch import load_file, save_file

    from vlmtune.merge.check import parity_check

    adapter, out = trained_adapter("qwen2_vl"), tmp_path / "merged"
    vlmtune.merge_adapter(adapter, out, check=False, **QUIET)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(k for k in index if k.endswith("layers.0.self_attn.q_proj.weight"))
    weights = load_file(str(out / index[name]))
    weights[name][0, 0] = float("nan")
    save_file(weights, str(out / index[name]), metadata={"format": "pt"})
    meta = json.loads((adapter / "vlmtune.json").read_text())
    with pytest.raises(vlmtune.VlmtuneError, match="logits of the merged model are NaN or infinite"):
        parity_check(out, builtin_model_path("tiny-qwen2-vl"), adapter, meta, torch.float32, log=lambda *_: None)


def test_an_update_that_overflows_the_output_dtype_is_refused(tmp_path):
    """Even with --no-check, no infinite or NaN weight is written into a merged folder."""
    from safetensors.torch import load_file, save_file

    adapter = make_adapter("qwen2_vl", tmp_path / "adapter", r=4, target_modules=["q_proj"])
    weights = load_file(str(adapter / WEIGHTS))
    save_file({k: v * 1e6 if "lora_B" in k else v for k, v in weights.items()}, str(adapter / WEIGHTS))
    with pytest.raises(vlmtune.VlmtuneError, match="NaN or infinite values after merging in torch.float16"):
        vlmtune.merge_adapter(adapter, tmp_path / "m", dtype="fp16", check=False, **QUIET)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("content, expected", [("{\"family\": \"qwen2_vl\", ", "is not valid JSON"),
                                               ("[1, 2]", "holds no JSON object")])
@pytest.mark.parametrize("name", ["merge", "predict", "predict --data"])
def test_a_corrupt_vlmtune_json_is_a_clear_error(trained_adapter, tmp_path, capsys, no_model_loading,  # noqa: F811
                                                 name, content, expected):
    adapter = copy_adapter(trained_adapter("qwen2_vl"), tmp_path / "adapter")
    (adapter / "vlmtune.json").write_text(content)
    args = command(name.split()[0], adapter, tmp_path)
    if name == "predict --data":  # the data format is looked up in vlmtune.json first
        args = ["predict", adapter, "--data", tmp_path / "rows.jsonl"]
    no_model_loading()
    code, _, err = run(capsys, *args)
    assert code == 2 and "Traceback" not in err, err
    assert f"{adapter / 'vlmtune.json'} {expected}" in err and "copy it again from the run's folder" in err
    assert not (tmp_path / "merged").exists()
