"""merge-adapter: parity with base + adapter for each family (LoRA and QLoRA), a complete folder, refusals, safety."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import vlmtune
from vlmtune import families
from vlmtune.cli import main
from vlmtune.demo import BUILTIN_MODELS, builtin_model_path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "data_templates" / "shapes"
BUILTIN_FOR = {family: name for name, family in BUILTIN_MODELS.items()}  # family -> builtin tiny model
FAMILIES = [pytest.param(f, marks=pytest.mark.skipif(f not in BUILTIN_FOR, reason=f"no builtin tiny {f} model"))
            for f in families.names()]
QUIET = {"log": lambda *_: None, "progress": False}
PIXELS = 28 * 28 * 16  # a max_pixels bound below the tiny models' default


def train_tiny(family: str, quant: str, out: Path, **overrides) -> Path:
    """A real adapter folder from a few training steps of `vlmtune.train` on the shapes data."""
    data = out.parent / f"{out.name}-train.jsonl"
    data.write_text("\n".join((SHAPES / "train.jsonl").read_text().splitlines()[:8]) + "\n")
    fields = {"model.name_or_path": f"builtin:{BUILTIN_FOR[family]}", "data.train": str(data),
              "data.image_root": str(SHAPES), "output_dir": str(out), "train.max_steps": 2,
              "train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 1,
              "train.learning_rate": 2e-2, "train.logging_steps": 1, "train.save_steps": 1000,
              "train.gradient_checkpointing": False, "data.num_workers": 0, "lora.dropout": 0.0,
              "quantization.mode": quant, "quantization.compute_dtype": "float32"}
    if families.get(family).pixels is not None:
        fields["data.max_pixels"] = PIXELS
    fields.update(overrides)
    vlmtune.train(vlmtune.load_recipe(None, overrides=fields), log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory):
    """(family, quant) -> adapter folder, trained once per session."""
    cache: dict[tuple[str, str], Path] = {}

    def get(family: str, quant: str = "none") -> Path:
        if (family, quant) not in cache:
            if quant != "none":
                pytest.importorskip("bitsandbytes")
            cache[family, quant] = train_tiny(family, quant, tmp_path_factory.mktemp("adapters") / f"{family}-{quant}")
        return cache[family, quant]

    return get


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
    return dst


def probe_inputs(processor, image_path):
    """Model inputs built by transformers' own processor (independent of vlmtune's formatting)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "It is red."}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    from PIL import Image

    return processor(text=[text], images=[Image.open(image_path).convert("RGB")], return_tensors="pt")


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.float()


@pytest.mark.parametrize("quant", ["none", "4bit"])
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_model_equals_base_plus_adapter(family, quant, trained_adapter, tmp_path, images):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText, AutoProcessor

    adapter = trained_adapter(family, quant)
    out = tmp_path / "merged"
    result = vlmtune.merge_adapter(adapter, out, **QUIET)
    assert result.check["max_relative_error"] <= result.check["tolerance"] == 1e-4
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        trained = {k.split(".lora_A.")[0] for k in f.keys() if ".lora_A." in k}
    assert result.check["adapter_effect"] > 1e-3 and result.merged_modules == len(trained) > 0

    # completeness: Auto classes load the folder alone; the processor is the adapter's, byte for byte
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer_config.json",
                 "tokenizer.json", "chat_template.jinja", "processor_config.json", "vlmtune.json"):
        assert (out / name).is_file(), name
    for name in ("processor_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (adapter / name).read_bytes(), name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left beside it
    processor = AutoProcessor.from_pretrained(out)
    pixels = families.get(family).pixels
    if pixels is not None:  # trained with a non-default bound (see train_tiny)
        assert pixels.get(processor.image_processor)[1] == PIXELS
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    base_dir = builtin_model_path(BUILTIN_FOR[family])
    reference = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), adapter).eval()
    inputs = probe_inputs(processor, images["wide"])
    got, want = logits(merged, inputs), logits(reference, inputs)
    with reference.disable_adapter():
        bare = logits(reference, inputs)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert (got - bare).abs().max() > 100 * (got - want).abs().max()
    generated = merged.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]

    # QLoRA: merged into full-precision weights, and the folder says nothing of quantization
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        with safe_open(str(out / shard), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert any("never into quantized" in n for n in result.notes) == (quant == "4bit")


def test_tied_embeddings_stay_tied_when_the_adapter_leaves_them_alone(trained_adapter, tmp_path):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "merged"
    vlmtune.merge_adapter(trained_adapter("qwen2_vl"), out, check=False, **QUIET)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_an_adapter_that_changes_a_tied_weight_is_stored_untied(tmp_path):
    """modules_to_save=[lm_head] on a tied model: PeftModel uses its own lm_head, the merged model must too."""
    adapter = train_tiny("qwen2_vl", "none", tmp_path / "adapter", **{"lora.modules_to_save": ["lm_head"]})
    out = tmp_path / "merged"
    result = vlmtune.merge_adapter(adapter, out, **QUIET)  # parity check included
    assert any("stores them separately" in n for n in result.notes)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]


def make_adapter(family: str, folder: Path, **lora) -> Path:
    """An adapter built directly with PEFT (random non-zero B), plus the files vlmtune writes beside it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base = builtin_model_path(BUILTIN_FOR[family])
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForImageTextToText.from_pretrained(base),
                           LoraConfig(init_lora_weights=False, **lora))
    model.save_pretrained(folder)
    AutoProcessor.from_pretrained(base).save_pretrained(folder)
    (folder / "vlmtune.json").write_text(json.dumps({"family": family, "base_model": f"builtin:{BUILTIN_FOR[family]}",
                                                     "quantization": "none"}))
    return folder


def test_rslora_rank_and_alpha_patterns_and_embedding_lora_scale_like_peft(tmp_path):
    lora = dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 3},
                target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj|embed_tokens)")
    adapter = make_adapter("qwen2_5_vl", tmp_path / "adapter", **lora)
    result = vlmtune.merge_adapter(adapter, tmp_path / "merged", **QUIET)
    assert result.merged_modules == 7 and result.check["max_relative_error"] <= 1e-4


def test_bf16_output_with_small_shards(trained_adapter, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "merged"
    result = vlmtune.merge_adapter(trained_adapter("qwen2_vl"), out, dtype="bf16", shard_size="300KB", **QUIET)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert result.num_shards == len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum((out / s).stat().st_size for s in shards) - sum(
        8 + int.from_bytes((out / s).read_bytes()[:8], "little") for s in shards)
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert result.check["merged_dtype"] == "bfloat16" and result.check["tolerance"] == 5e-2


# ---------------------------------------------------------------- refusals


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_merges_and_reports_the_parity_check(trained_adapter, tmp_path, capsys):
    code, out, err = run(capsys, "merge-adapter", trained_adapter("qwen2_vl"), "--out", tmp_path / "m")
    assert code == 0, err
    assert "parity check: 2 probe inputs with an image" in out and "tolerance 1e-04 for float32" in out
    assert f"wrote {tmp_path / 'm'}" in out


def test_force_replaces_an_earlier_merge_and_nothing_else(trained_adapter, tmp_path, capsys):
    adapter = trained_adapter("qwen2_vl")
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for flags in ([], ["--force"]):  # a folder merge-adapter did not write is never replaced, --force or not
        code, _, err = run(capsys, "merge-adapter", adapter, "--out", out, "--no-check", *flags)
        assert code == 2 and "is not empty and was not written by merge-adapter" in err and "Traceback" not in err
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    merged = tmp_path / "merged"
    assert run(capsys, "merge-adapter", adapter, "--out", merged, "--no-check")[0] == 0
    (merged / "stale.txt").write_text("from before")
    code, _, err = run(capsys, "merge-adapter", adapter, "--out", merged, "--no-check")
    assert code == 2 and "holds an earlier merge" in err and "--force" in err and (merged / "stale.txt").exists()
    code, _, err = run(capsys, "merge-adapter", adapter, "--out", merged, "--no-check", "--force")
    assert code == 0, err
    assert not (merged / "stale.txt").exists() and (merged / "config.json").is_file()


@pytest.mark.parametrize("remove, expected", [
    ("adapter_model.safetensors", "lacks adapter_model.safetensors"),
    ("adapter_config.json", "lacks adapter_config.json"),
    ("tokenizer_config.json", "lacks tokenizer_config.json"),
    ("vlmtune.json", "without vlmtune.json name the base model with --base"),
])
def test_an_adapter_folder_missing_files_is_refused(trained_adapter, tmp_path, capsys, remove, expected):
    adapter = copy_adapter(trained_adapter("qwen2_vl"), tmp_path / "adapter")
    (adapter / remove).unlink()
    code, _, err = run(capsys, "merge-adapter", adapter, "--out", tmp_path / "m")
    assert code == 2 and expected in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_a_base_of_another_family_is_refused(trained_adapter, tmp_path, capsys):
    code, _, err = run(capsys, "merge-adapter", trained_adapter("qwen2_vl"), "--out", tmp_path / "m",
                       "--base", "builtin:tiny-qwen2.5-vl")
    assert code == 2 and "is a qwen2_5_vl model but the adapter was trained on the qwen2_vl family" in err


def test_a_base_of_another_size_is_refused(trained_adapter, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForImageTextToText

    base = builtin_model_path("tiny-qwen2-vl")
    config = AutoConfig.from_pretrained(base)
    config.text_config.intermediate_size = 96
    other = tmp_path / "other-base"
    AutoModelForImageTextToText.from_config(config).save_pretrained(other)
    code, _, err = run(capsys, "merge-adapter", trained_adapter("qwen2_vl"), "--out", tmp_path / "m", "--base", other)
    assert code == 2 and "shapes do not match the adapter" in err and "mlp" in err


def test_adapter_targets_missing_from_the_base_are_refused(trained_adapter, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    adapter = copy_adapter(trained_adapter("qwen2_vl"), tmp_path / "adapter")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    weights = {k.replace("layers.1.", "layers.7."): v for k, v in weights.items()}
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    code, _, err = run(capsys, "merge-adapter", adapter, "--out", tmp_path / "m")
    assert code == 2 and "do not exist in the base model" in err and "layers.7." in err


def test_not_enough_disk_is_refused(trained_adapter, tmp_path, capsys, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    code, _, err = run(capsys, "merge-adapter", trained_adapter("qwen2_vl"), "--out", tmp_path / "m")
    assert code == 2 and "not enough disk space" in err and "1.00 KB are free" in err


def test_an_adapter_that_changes_nothing_is_an_error(tmp_path):
    adapter = make_adapter("qwen2_vl", tmp_path / "adapter", r=4, target_modules=["q_proj"])
    from safetensors.torch import load_file, save_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
              str(adapter / "adapter_model.safetensors"))
    with pytest.raises(vlmtune.VlmtuneError, match="does not change the base model's logits"):
        vlmtune.merge_adapter(adapter, tmp_path / "m", **QUIET)
    assert not (tmp_path / "m").exists()


def test_a_merge_that_changed_nothing_fails_the_check(trained_adapter, tmp_path, monkeypatch):
    from vlmtune.merge import lora as merge_lora

    monkeypatch.setattr(merge_lora.Edit, "apply", lambda self, weight, dtype: weight.to(dtype))
    with pytest.raises(vlmtune.VlmtuneError, match="the merge changed nothing"):
        vlmtune.merge_adapter(trained_adapter("qwen2_vl"), tmp_path / "m", **QUIET)
    assert not (tmp_path / "m").exists()


def test_a_wrong_merge_fails_the_check(trained_adapter, tmp_path, monkeypatch):
    from vlmtune.merge import lora as merge_lora

    monkeypatch.setattr(merge_lora.LoraPair, "delta", lambda self: (self.b.float() @ self.a.float()) * self.scale * 2)
    with pytest.raises(vlmtune.VlmtuneError, match="parity check failed"):
        vlmtune.merge_adapter(trained_adapter("qwen2_vl"), tmp_path / "m", **QUIET)


@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_merge_leaves_nothing_half_made(trained_adapter, tmp_path, monkeypatch, existing):
    from vlmtune.merge import io as merge_io

    out = tmp_path / "m"
    if existing:
        vlmtune.merge_adapter(trained_adapter("qwen2_vl"), out, check=False, **QUIET)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real_write = merge_io.ShardWriter.write

    def failing_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt  # as if Ctrl-C hit mid-merge
        real_write(self, name, tensor)

    monkeypatch.setattr(merge_io.ShardWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        vlmtune.merge_adapter(trained_adapter("qwen2_vl"), out, dtype="bf16", shard_size="200KB", force=True, **QUIET)
    assert calls["n"] == 20
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert not out.exists()


def test_shard_sizes_parse():
    from vlmtune.merge.io import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("300KB") == 300_000
    with pytest.raises(vlmtune.VlmtuneError, match="5GB"):
        parse_size("five gigs")


@pytest.mark.slow
def test_merge_memory_benchmark_smoke(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "merge.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "merge_memory.py"), "--arch", "tiny", "--shard-size",
                           "300KB", "--work-dir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["arms"]) == {"vlmtune", "peft"} and report["model"]["base_shards"] >= 2
    assert all(arm["peak_rss_bytes"] > 0 and arm["wall_seconds"] > 0 for arm in report["arms"].values())
    assert report["agreement"]["same_names"] and report["agreement"]["max_rel_diff"] < 1e-2
    assert {"torch", "transformers", "peft", "vlmtune"} <= set(report["versions"]) and report["machine"]["cpu_count"]
    assert not (tmp_path / "work").exists()  # the big files are cleaned up
