"""DeepSpeed ZeRO: shipped configs (autos filled as the HF integration does, validated by DeepSpeed's own
config class), refused combinations, and real 2-process CPU runs (torchrun, gloo, DeepSpeed's CPU
accelerator) of ZeRO-2 and ZeRO-3 with a text-only batch on one rank while the other has images: those runs share
one launch (tests/launch_scenarios.py) and carry the multiprocess marker, the rest runs in `make test`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import vlmtune
from vlmtune.distributed import deepspeed as dsc
from vlmtune.modeling import Runtime

from .launch_scenarios import Scenario, launch, run_one, selected

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "data_templates" / "shapes"
SHIPPED = ROOT / "recipes" / "deepspeed"

pytest.importorskip("deepspeed")


def recipe(**overrides):
    base = {"model.name_or_path": "builtin:tiny-qwen2-vl", "data.train": str(SHAPES / "train.jsonl"),
            "data.image_root": str(SHAPES)}
    base.update(overrides)
    return vlmtune.load_recipe(None, overrides=base)


def problems(**overrides) -> list[str]:
    with pytest.raises(vlmtune.RecipeError) as e:
        recipe(**overrides)
    return [str(x) for x in e.value.errors]


# ------------------------------------------------------------------ shipped configs
def test_shipped_json_files_are_the_presets():
    assert sorted(p.stem for p in SHIPPED.glob("*.json")) == sorted(dsc.PRESET_NAMES) == \
        ["zero2", "zero3", "zero3_offload"]
    for name in dsc.PRESET_NAMES:
        assert json.loads((SHIPPED / f"{name}.json").read_text()) == dsc.PRESETS[name], name
    assert dsc.zero_stage(dsc.load("zero2")) == 2 and dsc.zero_stage(dsc.load("zero3")) == 3
    assert dsc.offloads(dsc.load("zero3_offload")) == {"optimizer": True, "param": True}
    assert dsc.offloads(dsc.load("zero3")) == {"optimizer": False, "param": False}


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
@pytest.mark.parametrize("world", [1, 2, 16])
def test_every_shipped_config_validates_against_deepspeeds_config_class(name, world):
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads((SHIPPED / f"{name}.json").read_text())
    values = dsc.auto_values(world_size=world, micro_batch=2, grad_accum=4, max_grad_norm=1.0, bf16=True,
                             fp16=False, learning_rate=2e-4, weight_decay=0.0, hidden_size=1536)
    filled = dsc.fill_autos(raw, values)
    assert dsc.remaining_autos(filled) == []
    assert dsc.validate(filled, world_size=world) == []
    if world == 1:  # outside a process group DeepSpeed itself assumes one process: the plain class, unchanged
        ds = DeepSpeedConfig(filled)
        assert ds.zero_optimization_stage == dsc.zero_stage(raw)
        assert ds.train_batch_size == 8 and ds.train_micro_batch_size_per_gpu == 2
        assert ds.gradient_accumulation_steps == 4 and ds.gradient_clipping == 1.0
        assert ds.bfloat16_config.enabled and not ds.float16_config.enabled
        assert (ds.zero_config.offload_param is not None) == (name == "zero3_offload")  # only that preset pages
    # DeepSpeed itself rejects what it does not accept: a wrong batch identity, an unknown ZeRO key
    bad = dict(filled, train_batch_size=filled["train_batch_size"] + 1)
    assert "train_batch_size" in " ".join(dsc.validate(bad, world_size=world))
    typo = json.loads(json.dumps(filled))
    typo["zero_optimization"]["stage3_prefetch_bucket_sise"] = 1
    assert dsc.validate(typo, world_size=world) and "DeepSpeed rejects" in dsc.validate(typo, world_size=world)[0]


def _hf_fill(config: dict, *, world, micro, accum, clip, lr, wd, bf16, fp16, hidden, steps):
    """The HF integration's own filling (transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig)."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    args = SimpleNamespace(world_size=world, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
                           max_grad_norm=clip, learning_rate=lr, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                           weight_decay=wd, save_on_each_node=False, fp16=fp16, fp16_full_eval=False, bf16=bf16,
                           bf16_full_eval=False, get_warmup_steps=lambda n: 0)
    hf = HfTrainerDeepSpeedConfig(json.loads(json.dumps(config)))
    try:
        hf.trainer_config_process(args)
        model = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden))
        hf.trainer_config_finalize(args, model, steps)
        return hf.config
    finally:
        unset_hf_deepspeed_config()


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_autos_are_filled_as_the_hf_integration_fills_them(name, precision):
    kw = dict(world=4, micro=3, accum=5, clip=0.7, lr=3e-4, wd=0.01, hidden=96)
    ours = dsc.fill_autos(dsc.load(name), dsc.auto_values(
        world_size=kw["world"], micro_batch=kw["micro"], grad_accum=kw["accum"], max_grad_norm=kw["clip"],
        bf16=precision == "bf16", fp16=precision == "fp16", learning_rate=kw["lr"], weight_decay=kw["wd"],
        hidden_size=kw["hidden"]))
    theirs = _hf_fill(dsc.load(name), bf16=precision == "bf16", fp16=precision == "fp16", steps=10, **kw)
    assert ours == theirs
    assert ours["train_batch_size"] == 4 * 3 * 5 and ours["train_micro_batch_size_per_gpu"] == 3
    assert ours["gradient_accumulation_steps"] == 5 and ours["gradient_clipping"] == 0.7
    assert ours["bf16"]["enabled"] is (precision == "bf16") and ours["fp16"]["enabled"] is (precision == "fp16")
    assert ours["zero_optimization"]["reduce_bucket_size"] == 96 * 96


def test_optimizer_and_scheduler_autos_in_a_user_config(tmp_path):
    config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                        "weight_decay": "auto"}},
              "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                                "warmup_num_steps": "auto", "total_num_steps": "auto"}}}
    values = dsc.auto_values(world_size=2, micro_batch=1, grad_accum=2, max_grad_norm=1.0, bf16=False, fp16=False,
                             learning_rate=1e-3, weight_decay=0.1)
    filled = dsc.fill_autos(config, values)
    assert filled["optimizer"]["params"] == {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1}
    assert filled["scheduler"]["params"]["warmup_max_lr"] == 1e-3 and filled["scheduler"]["params"]["warmup_min_lr"] == 0
    # the step counts are the Trainer's to fill: left as auto, and accepted as such
    assert sorted(dsc.remaining_autos(filled)) == sorted(dsc.TRAINER_FILLED)
    assert dsc.validate(filled, world_size=2) == []
    assert dsc.validate(filled, world_size=2, allow_trainer_filled=False)[0].startswith("`auto` left unfilled")
    # an explicit value that contradicts the recipe is reported, as the Trainer would refuse it
    explicit = dict(config, train_micro_batch_size_per_gpu=4)
    assert "train_micro_batch_size_per_gpu is 4" in dsc.mismatches(explicit, values)[0]


# ------------------------------------------------------------------ refused combinations (recipe validation)
def test_unsupported_combinations_are_refused_with_every_problem_at_once():
    found = problems(**{"quantization.mode": "8bit", "distributed.deepspeed": "zero3"})
    assert any("quantization.mode: 8-bit" in p and "ZeRO-3" in p for p in found)
    found = problems(**{"quantization.mode": "4bit", "distributed.deepspeed": "zero3_offload",
                        "distributed.num_processes": 0})
    assert any("parameter offload is not supported" in p for p in found)
    assert any(p.startswith("distributed.num_processes") for p in found)
    found = problems(**{"distributed.deepspeed": "zer03"})
    assert any("did you mean 'zero3'" in p for p in found)
    found = problems(**{"distributed.deepspeed": "missing.json"})
    assert any(f"DeepSpeed config file not found: {Path.cwd() / 'missing.json'}" in p for p in found)  # cwd-relative
    found = problems(**{"distributed.hostfile": "no-such-hostfile", "distributed.launcher": "torchrun"})
    assert any("hostfile: file not found" in p for p in found) and any("deepspeed launcher" in p for p in found)
    found = problems(**{"distributed.num_nodes": 2, "distributed.node_rank": 2})
    assert any(p.startswith("distributed.node_rank: must be in [0, num_nodes=2)") for p in found)
    found = problems(**{"distributed.launcher": "deepspeed"})
    assert any("distributed.launcher: deepspeed needs distributed.deepspeed" in p for p in found)
    # what works is accepted: QLoRA with ZeRO-2 and ZeRO-3, 8-bit with ZeRO-2, LoRA with offload
    for ok in ({"quantization.mode": "4bit", "distributed.deepspeed": "zero2"},
               {"quantization.mode": "4bit", "distributed.deepspeed": "zero3"},
               {"quantization.mode": "8bit", "distributed.deepspeed": "zero2"},
               {"distributed.deepspeed": "zero3_offload"},
               {"distributed.deepspeed": str(SHIPPED / "zero3.json")}):
        recipe(**ok)


def test_a_config_file_next_to_the_recipe_is_found(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps(dsc.PRESETS["zero2"]))
    (tmp_path / "r.yaml").write_text(f"model: {{name_or_path: builtin:tiny-qwen2-vl}}\n"
                                     f"data: {{train: {SHAPES / 'train.jsonl'}}}\ndistributed: {{deepspeed: ds.json}}\n")
    r = vlmtune.load_recipe(tmp_path / "r.yaml")
    assert r.distributed.deepspeed == str(tmp_path / "ds.json")


CPU_FP32 = Runtime("cpu", torch.float32, "sdpa")


def refusals(overrides: dict, model_config, runtime=CPU_FP32) -> list[str]:
    return [str(e) for e in dsc.for_run(recipe(**overrides), runtime, model_config, world_size=1)[1]]


def test_model_level_refusals():
    cfg = SimpleNamespace(model_type="qwen2_vl", quantization_config={"quant_method": "awq"},
                          text_config=SimpleNamespace(hidden_size=64))
    assert any("pre-quantized checkpoint (awq)" in e for e in refusals({"distributed.deepspeed": "zero3"}, cfg))
    assert refusals({"distributed.deepspeed": "zero2"}, cfg) == []
    plain = SimpleNamespace(model_type="qwen2_vl", text_config=SimpleNamespace(hidden_size=64))
    qlora3 = {"distributed.deepspeed": "zero3", "quantization.mode": "4bit", "quantization.compute_dtype": "bfloat16"}
    assert any(e.startswith("quantization.compute_dtype: must equal the model dtype (float32)")
               for e in refusals(qlora3, plain))
    assert refusals(qlora3, plain, Runtime("cuda", torch.bfloat16, "sdpa")) == []
    assert refusals({**qlora3, "quantization.compute_dtype": "float32"}, plain) == []


def test_the_run_config_is_filled_and_validated_once_for_the_plan(tmp_path):
    """One reading of the preset or file, every recipe-driven `auto` filled from the recipe, the runtime, the model's
    hidden size and the number of processes; the plan carries it and the Trainer's arguments get it as it is."""
    model = SimpleNamespace(model_type="qwen2_vl", text_config=SimpleNamespace(hidden_size=96))
    r = recipe(**{"distributed.deepspeed": "zero3", "train.per_device_train_batch_size": 3,
                  "train.gradient_accumulation_steps": 5, "train.max_grad_norm": 0.5})
    config, errs = dsc.for_run(r, Runtime("cuda", torch.bfloat16, "sdpa"), model, world_size=4)
    assert errs == [] and dsc.remaining_autos(config) == []
    assert config["train_batch_size"] == 4 * 3 * 5 and config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert config["zero_optimization"]["reduce_bucket_size"] == 96 * 96
    assert dsc.for_run(recipe(), CPU_FP32, model, world_size=1) == (None, [])
    plan = vlmtune.plan(recipe(**{"distributed.deepspeed": "zero3", "train.max_steps": 1, "train.use_cpu": True}))
    hidden = plan.model_config.text_config.hidden_size
    assert plan.zero_stage == 3 and plan.world_size == 1
    assert plan.deepspeed["zero_optimization"]["reduce_bucket_size"] == hidden * hidden
    assert plan.deepspeed["bf16"]["enabled"] is False and plan.deepspeed["train_batch_size"] == 8  # CPU, 1 x 1 x 8
    assert vlmtune.plan(recipe(**{"train.max_steps": 1, "train.use_cpu": True})).deepspeed is None


def test_building_the_plan_and_the_trainer_arguments_leaves_the_environment_alone(monkeypatch, tmp_path):
    """Only prepare_deepspeed_process sets process-wide state; the plan and the SFT config do not."""
    import trl  # noqa: F401 (imported first: importing it sets variables of its own, e.g. torch's inductor cache)
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from vlmtune.training import sft_config

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    r = recipe(**{"distributed.deepspeed": "zero3", "train.max_steps": 1, "train.use_cpu": True})
    calls = []
    for name in ("load", "validate"):  # the run's config: read and validated once, for the plan
        real = getattr(dsc, name)
        monkeypatch.setattr(dsc, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    before = dict(os.environ)
    plan = vlmtune.plan(r)
    args = sft_config(plan, tmp_path / "ckpt")
    assert dict(os.environ) == before
    assert calls == ["load", "validate"]
    assert args.deepspeed == plan.deepspeed and not torch.distributed.is_initialized()
    del args  # transformers registers the arguments' DeepSpeed config only while they live
    assert not is_deepspeed_zero3_enabled()


def test_the_one_step_that_sets_process_state(monkeypatch):
    """prepare_deepspeed_process: a one-member process group's environment (values already set stay), DeepSpeed's
    communication joined, and the Hugging Face ZeRO-3 config registered while the returned object lives."""
    import deepspeed
    from deepspeed import comm
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from vlmtune.distributed import prepare_deepspeed_process

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # remembered, so that what the step sets is removed afterwards
        monkeypatch.delenv(key)
    monkeypatch.setenv("MASTER_PORT", "6123")
    joined = []
    monkeypatch.setattr(comm, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: joined.append(kw))
    r = recipe(**{"distributed.deepspeed": "zero3"})
    assert prepare_deepspeed_process(SimpleNamespace(recipe=r, deepspeed=None)) is None and not joined
    config, _ = dsc.for_run(r, CPU_FP32, SimpleNamespace(hidden_size=64), world_size=1)
    registered = prepare_deepspeed_process(SimpleNamespace(recipe=r, deepspeed=config))
    assert {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} == \
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "6123"}
    assert joined == [{"auto_mpi_discovery": False}] and is_deepspeed_zero3_enabled()
    del registered
    assert not is_deepspeed_zero3_enabled()


def test_qlora_under_zero3_stores_4bit_weights_in_the_compute_dtype():
    from vlmtune.families import get
    from vlmtune.modeling import quantization_config

    family = get("qwen2_vl")
    q3 = quantization_config(recipe(**{"quantization.mode": "4bit", "quantization.compute_dtype": "float32"})
                             .quantization, family, zero_stage=3)
    assert q3.bnb_4bit_quant_storage == torch.float32
    q2 = quantization_config(recipe(**{"quantization.mode": "4bit"}).quantization, family, zero_stage=2)
    assert q2.bnb_4bit_quant_storage == torch.uint8  # ZeRO-2 does not partition weights: bitsandbytes' default


# ------------------------------------------------------------------ 2 processes on the CPU
TEXT_ONLY = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Name a shape."}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "A square."}]}]}
# rows in file order; with 2 ranks, 2 rows a batch and sequential sampling, step k gives rows 4k..4k+1 to
# rank 0 and 4k+2..4k+3 to rank 1: step 1 images | text-only, step 2 mixed | mixed, step 3 text-only | images
PATTERN = "IITTITTITTII"
PROBE_IDS = [[1, 5, 9, 13, 17, 21, 25, 29]]


@pytest.fixture(scope="module")
def mp_data(tmp_path_factory):
    rows = iter((SHAPES / "train.jsonl").read_text().splitlines())
    lines = [next(rows) if c == "I" else json.dumps(TEXT_ONLY) for c in PATTERN]
    path = tmp_path_factory.mktemp("mp") / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def shm_op_built():
    """DeepSpeed's CPU accelerator JIT-builds a shared-memory op on first use; two ranks building it at once race."""
    code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=600)


def sft_recipe(folder: Path, data: Path) -> Path:
    """3 steps of 2 rows a process on the tiny Qwen2-VL, output in folder/out."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(
        "model: {name_or_path: 'builtin:tiny-qwen2-vl'}\n"
        f"data: {{train: '{data}', image_root: '{SHAPES}', max_pixels: 12544, num_workers: 0}}\n"
        "lora: {dropout: 0.0}\n"
        "train: {max_steps: 3, per_device_train_batch_size: 2, gradient_accumulation_steps: 1, "
        "learning_rate: 0.01, logging_steps: 1, save_steps: 1000, use_cpu: true}\n"
        f"output_dir: '{folder / 'out'}'\n")
    return folder / "recipe.yaml"


def run_worker(tmp_path, data, *overrides, env_extra=None, timeout=240, worker="ds_worker.py"):
    """One run of a worker script, in a launch of its own."""
    from vlmtune.demo import builtin_model_path

    builtin_model_path("tiny-qwen2-vl")  # built once here, not by two ranks at once
    out, probe = tmp_path / "out", tmp_path / "probe"
    sft_recipe(tmp_path, data)
    env = dict(os.environ, VLMTUNE_PROBE_DIR=str(probe), VLMTUNE_PROBE_SEQUENTIAL="1", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", **(env_extra or {}))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, str(ROOT / "tests" / worker), "sft", str(tmp_path / "recipe.yaml"), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    ranks = [json.loads(p.read_text()) for p in sorted(probe.glob("rank*.json"))] if probe.is_dir() else []
    return proc, out, probe, ranks


def assert_adapter_reloads_with_training_logits(out: Path, probe: Path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values())
    assert any("lora_B" in k and t.abs().max() > 0 for k, t in weights.items())  # trained, not the zero init
    shapes = {k: tuple(t.shape) for k, t in weights.items()}
    assert shapes["base_model.model.model.language_model.layers.0.mlp.down_proj.lora_A.weight"] == (16, 128)
    from vlmtune.modeling import resolve_model_path

    base = AutoModelForImageTextToText.from_pretrained(resolve_model_path("builtin:tiny-qwen2-vl"))
    ids = torch.tensor(PROBE_IDS)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, out).eval()
        after = tuned(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    in_training = torch.load(probe / "logits.pt")
    torch.testing.assert_close(after, in_training, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, in_training)


# the 2-process runs of this module, in one launch; the run that breaks comes last (it ends the launch)
RUNS = ["sft_zero2", "sft_zero3", "resume_save", "resume", "no_dummy"]


@pytest.fixture(scope="module")
def runs(request, mp_data, shm_op_built, tmp_path_factory):
    root = tmp_path_factory.mktemp("ds-runs")
    two = ("distributed.num_processes=2",)
    resume = root / "resume"  # both resume runs: one output folder
    argv = {"sft_zero2": ("distributed.deepspeed=zero2", *two), "sft_zero3": ("distributed.deepspeed=zero3", *two),
            "resume_save": ("distributed.deepspeed=zero2", *two, "train.save_steps=2", "train.max_steps=2"),
            "resume": ("distributed.deepspeed=zero2", *two, "train.save_steps=2", "train.max_steps=3",
                       "train.resume_from_checkpoint=latest"),
            "no_dummy": ("distributed.deepspeed=zero3", *two)}
    scenarios = []
    for name in selected(request, RUNS):
        folder = resume if name.startswith("resume") else root / name
        scenarios.append(Scenario(name, ["sft", str(sft_recipe(folder, mp_data)), *argv[name]], folder / "out",
                                  env={"VLMTUNE_PROBE_NO_DUMMY": "1"} if name == "no_dummy" else {}))
    return launch(root, scenarios, timeout=900)


def log_of(run) -> str:
    return run.stdout[-3000:] + run.stderr[-6000:]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [
    pytest.param("zero2", marks=[pytest.mark.scenario("sft_zero2"), pytest.mark.multiprocess_ci]),
    pytest.param("zero3", marks=[pytest.mark.scenario("sft_zero3"), pytest.mark.multiprocess_ci])])
def test_two_cpu_processes_train_with_text_only_batch_on_one_rank(stage, runs):
    run = runs[f"sft_{stage}"]
    out, probe, ranks = run.out, run.probe, run.ranks
    assert run.returncode == 0, log_of(run)
    # vlmtune sft re-launched itself under torchrun (the launch's first run); rank 0 alone reported and wrote
    assert "launching: " in run.launch_stderr and "torch.distributed.run" in run.launch_stderr
    assert run.stdout.count("done: 3 steps") == 1 and run.stdout.count("saved adapter") == 1
    assert run.stdout.count("train data: ") == 1
    assert len(ranks) == 2 and all(r["world_size"] == 2 for r in ranks)
    assert all(r["distributed_type"] == "DistributedType.DEEPSPEED" for r in ranks)
    assert all(r["ds_config"]["zero_optimization"]["stage"] == int(stage[-1]) for r in ranks)
    assert all(r["zero3"] == (stage == "zero3") for r in ranks)
    assert ranks[0]["ds_config"]["train_batch_size"] == 4 and ranks[0]["ds_config"]["gradient_clipping"] == 1.0
    # each rank trained on its own shard (fetches of one row are the Trainer's look at row 0)
    shards = [{s for batch in r["sources"] if len(batch) == 2 for s in batch} for r in ranks]
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == len(PATTERN)
    # one step had images on rank 0 and none on rank 1, one the reverse; the text-only rank ran the dummy image
    forwards = [r["forwards"] for r in ranks]
    assert forwards == [[True, True, False], [False, True, True]]
    assert all(r["dummy_calls"] >= 1 for r in ranks)
    meta = json.loads((out / "vlmtune.json").read_text())
    assert meta["distributed"] == {"deepspeed": stage, "world_size": 2}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert_adapter_reloads_with_training_logits(out, probe)


@pytest.fixture(scope="module")
def one_process(mp_data, tmp_path_factory):
    """The single-process reference of the ZeRO-2 run: 4 rows a step, the same global batches."""
    folder = tmp_path_factory.mktemp("sft-one")
    return run_one(folder, ["sft", str(sft_recipe(folder, mp_data)), "train.per_device_train_batch_size=4"])


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.multiprocess_ci
@pytest.mark.scenario("sft_zero2")
def test_zero2_two_processes_train_as_one_process(runs, one_process):
    from safetensors.torch import load_file

    run = runs["sft_zero2"]
    assert run.returncode == 0, log_of(run)
    assert one_process.returncode == 0, log_of(one_process)
    assert one_process.ranks[0]["world_size"] == 1 and one_process.ranks[0]["ds_config"] is None
    steps = [[{k: h[k] for k in ("loss", "grad_norm", "num_tokens")} for h in r[0]["log_history"] if "loss" in h]
             for r in (run.ranks, one_process.ranks)]
    assert len(steps[0]) == len(steps[1]) == 3
    for two, one in zip(*steps, strict=True):  # tokens weighted across the ranks as within one process
        assert two["num_tokens"] == one["num_tokens"]
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-4) and two["grad_norm"] == pytest.approx(
            one["grad_norm"], rel=1e-4), steps
    two_w, one_w = (load_file(out / "adapter_model.safetensors") for out in (run.out, one_process.out))
    assert two_w.keys() == one_w.keys() and any("lora_B" in k and t.abs().max() > 0 for k, t in one_w.items())
    for k in two_w:
        torch.testing.assert_close(two_w[k], one_w[k], rtol=1e-3, atol=1e-5, msg=k)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.scenario("no_dummy")
def test_zero3_without_the_dummy_image_breaks(runs):
    """The trap is real: leave the dummy vision forward out and the ranks' collectives no longer match
    (gloo reports the mismatch; NCCL on GPUs hangs until its timeout)."""
    run = runs["no_dummy"]
    assert run.returncode != 0
    log = run.stdout + run.stderr
    assert "collective mismatch" in log or "disagreement on list length" in log or "Connection" in log, log[-4000:]
    assert not (run.out / "adapter_model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("ds,quant", [("zero3_offload", "none"), ("zero3", "4bit")])
def test_one_process_with_deepspeed_needs_no_launcher(ds, quant, mp_data, shm_op_built, tmp_path):
    """A single process: vlmtune sets up the one-member process group DeepSpeed needs (RANK, MASTER_ADDR...).
    QLoRA + ZeRO-3 loads without a device_map (transformers refuses one under ZeRO-3)."""
    if quant != "none":
        pytest.importorskip("bitsandbytes")
    proc, out, _, _ = run_worker(tmp_path, mp_data, f"distributed.deepspeed={ds}", "train.max_steps=1",
                                 f"quantization.mode={quant}", "quantization.compute_dtype=float32")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "launching: " not in proc.stderr and proc.stdout.count("done: 1 steps") == 1
    weights = (out / "adapter_model.safetensors")
    assert weights.stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.scenario("resume_save", "resume")
def test_zero2_checkpoint_resumes_on_the_same_number_of_processes(runs):
    first, run = runs["resume_save"], runs["resume"]
    assert first.returncode == 0, log_of(first)
    assert (first.out / "checkpoints" / "checkpoint-2").is_dir()
    assert run.returncode == 0, log_of(run)
    assert run.stdout.count("done: 3 steps") == 1
    assert all(len(r["forwards"]) == 1 for r in run.ranks)  # only step 3 ran: steps 1-2 came from the checkpoint
    assert_adapter_reloads_with_training_logits(run.out, run.probe)


def test_videos_under_zero3_are_refused_before_training():
    from vlmtune.data.prepare import Example, PreparedData
    from vlmtune.preflight import _zero3_video_problems

    data = PreparedData(examples=[Example([1], [1], [], [], "d.jsonl:1"),
                                  Example([1], [1], [], [], "d.jsonl:2", videos=[object()])])
    assert "use distributed.deepspeed=zero2" in _zero3_video_problems(3, {"train": data})[0]
    assert _zero3_video_problems(2, {"train": data}) == [] and _zero3_video_problems(0, {"train": data}) == []
