"""Launcher detection and re-launch, and the ZeRO-3 vision-tower trap per family (single process).

The real multi-process runs are in test_deepspeed.py."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import vlmtune
from vlmtune import distributed, families
from vlmtune.distributed import launch
from vlmtune.errors import VlmtuneError

from .conftest import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "data_templates" / "shapes"
NO_LAUNCHER: dict = {}
TORCHRUN_ENV = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def recipe(**overrides):
    base = {"model.name_or_path": "builtin:tiny-qwen2-vl", "data.train": str(SHAPES / "train.jsonl"),
            "data.image_root": str(SHAPES)}
    base.update(overrides)
    return vlmtune.load_recipe(None, overrides=base)


@pytest.fixture(params=[0, 2], ids=["cpu-only", "2-gpus"])
def gpus(request, monkeypatch) -> int:
    """The machine as the launcher code sees it: no GPU, or two (so no assertion depends on the machine)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: request.param > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: request.param)
    return request.param


# ------------------------------------------------------------------ launcher detection
def test_a_process_started_by_a_launcher_is_recognised():
    assert distributed.under_launcher(TORCHRUN_ENV)
    assert distributed.under_launcher({"LOCAL_RANK": "0", "WORLD_SIZE": "8"})  # deepspeed / accelerate launch
    assert not distributed.under_launcher({})
    assert not distributed.under_launcher({"RANK": "0"})  # no world size: not a launcher's process
    assert distributed.rank(TORCHRUN_ENV) == 1 and distributed.world_size(TORCHRUN_ENV) == 2
    assert not distributed.is_main_process(TORCHRUN_ENV) and distributed.is_main_process({})


def test_when_vlmtune_launches_itself(gpus):
    two = recipe(**{"distributed.num_processes": 2})
    assert distributed.needs_launch(two, NO_LAUNCHER)
    assert not distributed.needs_launch(two, TORCHRUN_ENV)  # already one of the launched processes
    assert not distributed.needs_launch(recipe(), NO_LAUNCHER)
    assert distributed.needs_launch(recipe(**{"distributed.num_nodes": 2, "distributed.master_addr": "10.0.0.1"}),
                                    NO_LAUNCHER)
    zero3 = recipe(**{"distributed.deepspeed": "zero3"})  # DeepSpeed: every local GPU, one process without one
    assert distributed.processes_per_node(zero3) == max(gpus, 1)
    assert distributed.needs_launch(zero3, NO_LAUNCHER) == (gpus > 1)
    assert distributed.processes_per_node(recipe(**{"distributed.deepspeed": "zero3", "train.use_cpu": True})) == 1
    assert distributed.processes_per_node(recipe()) == 1  # no DeepSpeed: one process unless asked for more


def test_torchrun_command(monkeypatch, gpus):
    monkeypatch.setattr(launch, "free_port", lambda: 41234)
    r = recipe(**{"distributed.num_processes": 2, "distributed.deepspeed": "zero2"})
    cmd = distributed.launch_command(r, ["sft", "r.yaml", "distributed.num_processes=2"], env={})
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[3:8] == ["--nproc_per_node=2", "--nnodes=1", "--node_rank=0", "--master_addr=127.0.0.1",
                        "--master_port=41234"]
    assert cmd[8:] == ["-m", "vlmtune.cli", "sft", "r.yaml", "distributed.num_processes=2"]
    wrapped = distributed.launch_command(r, ["sft", "r.yaml"], entry="/x/train.py", env={})
    assert wrapped[8:] == ["/x/train.py", "sft", "r.yaml"]


def test_multi_node_rendezvous_from_recipe_or_environment(gpus, monkeypatch):
    if gpus:  # four processes per node need four GPUs
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    r = recipe(**{"distributed.num_processes": 4, "distributed.num_nodes": 2})
    with pytest.raises(VlmtuneError, match="master_addr"):
        distributed.launch_command(r, ["sft"], env={})
    cmd = distributed.launch_command(r, ["sft"], env={"MASTER_ADDR": "10.1.2.3", "NODE_RANK": "1"})
    assert "--nnodes=2" in cmd and "--node_rank=1" in cmd and "--master_addr=10.1.2.3" in cmd
    assert "--master_port=29500" in cmd and "--nproc_per_node=4" in cmd
    r = recipe(**{"distributed.num_processes": 4, "distributed.num_nodes": 2, "distributed.node_rank": 0,
                  "distributed.master_addr": "node0", "distributed.master_port": 6000})
    cmd = distributed.launch_command(r, ["sft"], env={"MASTER_ADDR": "ignored", "NODE_RANK": "1"})
    assert "--node_rank=0" in cmd and "--master_addr=node0" in cmd and "--master_port=6000" in cmd


def test_deepspeed_and_accelerate_commands(tmp_path, gpus):
    hosts = tmp_path / "hosts"
    hosts.write_text("node0 slots=8\nnode1 slots=8\n")
    r = recipe(**{"distributed.deepspeed": "zero3", "distributed.hostfile": str(hosts),
                  "distributed.master_addr": "node0"})
    assert distributed.launcher_for(r) == "deepspeed" and distributed.needs_launch(r, NO_LAUNCHER)
    cmd = distributed.launch_command(r, ["sft", "r.yaml"], env={})
    assert cmd[:4] == [sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank"]
    assert f"--hostfile={hosts}" in cmd and "--master_port=29500" in cmd
    assert cmd[-4:] == ["--module", "vlmtune.cli", "sft", "r.yaml"]
    r = recipe(**{"distributed.deepspeed": "zero2", "distributed.launcher": "deepspeed",
                  "distributed.num_processes": 2})
    assert "--num_gpus=2" in distributed.launch_command(r, ["sft"], env={})
    r = recipe(**{"distributed.launcher": "accelerate", "distributed.num_processes": 2})
    cmd = distributed.launch_command(r, ["sft"], env={})
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"] and "--num_processes=2" in cmd
    assert ("--multi_gpu" if gpus else "--cpu") in cmd
    assert cmd[-3:] == ["-m", "vlmtune.cli", "sft"]


def test_more_processes_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    r = recipe(**{"distributed.num_processes": 8, "distributed.deepspeed": "zero2"})
    with pytest.raises(VlmtuneError, match="num_processes=8 but this machine has 2 GPU"):
        distributed.launch_command(r, ["sft"], env={})
    assert distributed.processes_per_node(recipe(**{"distributed.deepspeed": "zero2"})) == 2  # every local GPU


def test_entry_script():
    assert distributed.entry_script(str(ROOT / "tests" / "ds_worker.py")) == str(ROOT / "tests" / "ds_worker.py")
    assert distributed.entry_script(str(ROOT / "vlmtune" / "cli.py")) is None  # python -m vlmtune.cli
    assert distributed.entry_script(str(ROOT / ".venv" / "bin" / "vlmtune")) is None  # the console script
    assert distributed.entry_script("-c") is None


def test_cli_relaunches_itself_once(monkeypatch, capsys):
    from vlmtune import cli, training

    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    ran = []
    monkeypatch.setattr(launch.subprocess, "run", lambda cmd, check: ran.append(cmd) or SimpleNamespace(returncode=7))
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("the launching process must not train"))
    args = ["sft", str(ROOT / "recipes" / "tiny-demo.yaml"), "distributed.num_processes=2"]
    assert cli.main(args) == 7  # the launcher's exit status
    assert len(ran) == 1 and ran[0][-3:] == args and "torch.distributed.run" in ran[0]
    assert "launching: " in capsys.readouterr().err

    for key, value in TORCHRUN_ENV.items():  # now as one of the launched processes: train, never re-launch
        monkeypatch.setenv(key, value)
    trained = []
    monkeypatch.setattr(training, "train", lambda r, **kw: trained.append(r) or SimpleNamespace(metrics={}, output_dir="x"))
    assert cli.main(args) == 0
    assert len(ran) == 1 and len(trained) == 1
    assert capsys.readouterr().out == ""  # rank 1 prints no summary


# ------------------------------------------------------------------ the vision tower in step, per family
@pytest.fixture(scope="module")
def loaded(model_dir, processor_for):
    from transformers import AutoModelForImageTextToText

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = (AutoModelForImageTextToText.from_pretrained(model_dir(name)).eval(), processor_for(name))
        return cache[name]

    return get


def _batches(processor):
    tok = processor.tokenizer
    text_ids = tok("Name a shape. A square.", return_tensors="pt")["input_ids"]
    text = {"input_ids": text_ids, "attention_mask": torch.ones_like(text_ids), "labels": text_ids}
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Yellow."}]}]
    image = processor(text=[processor.apply_chat_template(messages, tokenize=False)],
                      images=[[Image.new("RGB", (64, 48), (200, 200, 0))]], return_tensors="pt")
    image = dict(image, labels=image["input_ids"])
    return text, image


def _vision_grads(model, family) -> dict[str, torch.Tensor | None]:
    """Gradients of the vision tower's and projector's parameters, by name."""
    return {n: p.grad for n, p in model.named_parameters() if family.component_of(n) in ("vision", "projector")}


@pytest.mark.parametrize("family_name", FAMILIES)
def test_every_forward_runs_the_vision_tower_once_and_the_loss_is_unchanged(family_name, loaded):
    """Under ZeRO-3 (and DDP) every rank must produce gradients for the same weights: with the tower and projector
    trainable, every one of their parameters an image batch trains gets a (zero) gradient from a text-only batch."""
    family = families.get(family_name)
    model, processor = loaded(family_name)
    text, image = _batches(processor)
    tower = model.get_submodule(family.vision_prefix)
    tower_calls = []
    counter = tower.register_forward_hook(lambda *a: tower_calls.append(1))
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():  # train the tower and projector (lora.train_vision_tower / _projector)
        p.requires_grad_(family.component_of(n) in ("vision", "projector"))
    try:
        with torch.no_grad():
            plain_text = model(**text).loss
        plain_image = model(**image).loss
        plain_image.backward()
        trained = {n for n, g in _vision_grads(model, family).items() if g is not None}
        assert any(family.component_of(n) == "projector" for n in trained)
        model.zero_grad(set_to_none=True)
        assert len(tower_calls) == 1  # without the hook a text-only batch skips the tower: the ZeRO-3 trap
        hook = distributed.keep_vision_in_step(model, family, processor)
        try:
            tower_calls.clear()
            hooked_text = model(**text).loss
            assert len(tower_calls) == 1 and hook.calls == 1
            hooked_text.backward()  # the backward pass goes through the tower too, with zero gradients
            with torch.no_grad():
                hooked_image = model(**image).loss
            assert len(tower_calls) == 2 and hook.calls == 1  # images: the model's own call, no dummy
        finally:
            hook.remove()
        grads = _vision_grads(model, family)
        missing = sorted(n for n in trained if grads[n] is None)
        assert not missing, f"{len(missing)} trained weights get no gradient from a text-only batch: {missing[:3]}"
        assert all(g is None or torch.count_nonzero(g) == 0 for g in grads.values())
    finally:
        counter.remove()
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(trainable[n])
    assert math.isfinite(plain_text.item())
    assert torch.equal(hooked_text.detach(), plain_text) and torch.equal(hooked_image, plain_image.detach())


def test_a_trained_projector_gets_zero_gradients_from_a_text_only_batch(loaded):
    """Under ZeRO-3 (and DDP) every rank must produce gradients for the same weights."""
    from peft import LoraConfig, get_peft_model

    family = families.get("qwen2_vl")
    base, processor = loaded("qwen2_vl")
    import copy

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=r".*(merger\.mlp\.[02]|q_proj)"))
    text, _ = _batches(processor)
    model(**text).loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n and "merger" in n]
    assert lora and all(p.grad is None for p in lora)  # the trap: this rank has no gradient for them
    model.zero_grad(set_to_none=True)
    hook = distributed.keep_vision_in_step(model, family, processor)
    model(**text).loss.backward()
    hook.remove()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in lora)


def test_a_family_can_supply_its_own_dummy_input(loaded):
    import dataclasses

    base = families.get("qwen2_vl")
    _, processor = loaded("qwen2_vl")
    made = []

    def build(family, proc):
        made.append((family.name, proc))
        return distributed.dummy_vision_inputs(base, proc)

    custom = dataclasses.replace(base, name="custom", dummy_vision_inputs=build)
    inputs = distributed.dummy_vision_inputs(custom, processor)
    assert made == [("custom", processor)] and inputs["image_grid_thw"].shape == (1, 3)


# ------------------------------------------------------------------ ZeRO-3 bookkeeping
def test_nothing_to_gather_without_zero3(loaded):
    model, _ = loaded("qwen2_vl")
    assert distributed.gathered_adapter_state(model) is None


def test_trainable_report_counts_whole_zero3_parameters():
    from vlmtune.modeling import trainable_report

    sliced = torch.nn.Parameter(torch.zeros(0))
    sliced.ds_numel = 1000  # what ZeRO-3 leaves on a rank: an empty tensor and the full size beside it
    whole = torch.nn.Parameter(torch.zeros(10), requires_grad=False)
    model = SimpleNamespace(named_parameters=lambda: [("model.language_model.a.lora_A.weight", sliced),
                                                      ("model.language_model.b.weight", whole)])
    report = trainable_report(model, families.get("qwen2_vl"))
    assert report["language"] == (1000, 1010)
