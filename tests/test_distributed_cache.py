"""The prepared-data cache and packing under two DeepSpeed processes on the CPU (ZeRO-2 and ZeRO-3).

One test per stage, two runs of one step over the same 8 examples (the four runs in one launch):
- packed, cache cold: rank 0 formats and stores the entry, rank 1 formats nothing and loads it; both hold the
  same examples;
- unpacked, cache warm (train.* fields are not in the key): no rank formats anything.
The packed step (4 bins, 1 per micro-batch, 2 micro-batches per rank) and the unpacked one (2 examples per
micro-batch) cover the same examples, so their loss, gradient norm, trained adapter and logged token count
must be equal: gradient accumulation and the two processes weight tokens as the unpacked run does."""

from __future__ import annotations

import json

import pytest
import torch

import vlmtune
from vlmtune.data.packing import pack_bins

from .launch_scenarios import Scenario, launch, selected
from .test_deepspeed import SHAPES, sft_recipe, shm_op_built  # noqa: F401 (a fixture)

pytestmark = pytest.mark.multiprocess  # several processes (torchrun / DeepSpeed): make test-multiprocess

pytest.importorskip("deepspeed")

BINS = 4  # 2 ranks x 2 micro-batches of one bin


def _data(folder):
    path = folder / "train.jsonl"
    path.write_text("\n".join((SHAPES / "train.jsonl").read_text().splitlines()[:8]) + "\n")
    return path


def _capacity(path) -> int:
    """A data.max_length that packs the 8 examples into exactly BINS bins (nothing dropped: all fit alone)."""
    recipe = vlmtune.load_recipe(None, overrides={"model.name_or_path": "builtin:tiny-qwen2-vl", "data.train": str(path),
                                                  "data.image_root": str(SHAPES), "data.max_pixels": 12544,
                                                  "data.cache": False, "train.use_cpu": True})
    lengths = [len(e.input_ids) for e in vlmtune.plan(recipe).train.examples]
    assert len(lengths) == 8
    for capacity in range(max(lengths), sum(lengths)):
        if len(pack_bins(lengths, capacity, 42)) == BINS:
            return capacity
    raise AssertionError(f"no capacity packs {lengths} into {BINS} bins")


def _step(ranks: list[dict]) -> dict:
    logged = [h for h in ranks[0]["log_history"] if "loss" in h]
    assert len(logged) == 1 and logged[0]["step"] == 1
    return logged[0]


def _lora_b(out):
    from safetensors.torch import load_file

    return {k: t for k, t in load_file(out / "adapter_model.safetensors").items() if "lora_B" in k}


RUNS = ["packed_zero2", "unpacked_zero2", "packed_zero3", "unpacked_zero3"]


@pytest.fixture(scope="module")
def runs(request, shm_op_built, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("cache-runs")
    data = _data(root)
    names = selected(request, RUNS)
    capacity = _capacity(data) if names else 0
    scenarios = []
    for name in names:
        packed, stage = name.split("_")
        common = (f"distributed.deepspeed={stage}", "distributed.num_processes=2", "data.cache=true",
                  f"data.max_length={capacity}", "train.max_steps=1", "train.gradient_accumulation_steps=2",
                  "train.warmup_ratio=0.0", "train.lr_scheduler_type=constant", "train.learning_rate=0.001")
        shape = ("train.packing=true", "train.per_device_train_batch_size=1") if packed == "packed" else \
            ("train.packing=false", "train.per_device_train_batch_size=2")
        folder = root / name
        scenarios.append(Scenario(name, ["sft", str(sft_recipe(folder, data)), *common, *shape], folder / "out",
                                  cache=stage))  # a stage's two runs: one cache, cold then warm
    return launch(root, scenarios, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [
    pytest.param("zero2", marks=[pytest.mark.scenario("packed_zero2", "unpacked_zero2"), pytest.mark.multiprocess_ci]),
    pytest.param("zero3", marks=pytest.mark.scenario("packed_zero3", "unpacked_zero3"))])
def test_two_ranks_share_the_prepared_cache_and_pack_as_the_unpacked_run(stage, runs):
    run_p, run_u = runs[f"packed_{stage}"], runs[f"unpacked_{stage}"]
    out_p, packed, out_u, unpacked = run_p.out, run_p.ranks, run_u.out, run_u.ranks
    assert run_p.returncode == 0, run_p.stdout[-3000:] + run_p.stderr[-6000:]
    assert f"packing: 8 examples into {BINS} rows" in run_p.stdout
    assert run_p.stderr.count("prepared data cached: ") == 1
    assert [(r["formatted"], r["stored"]) for r in packed] == [(8, 1), (0, 0)]  # rank 0 prepared, rank 1 loaded
    assert packed[0]["examples"] == packed[1]["examples"] and packed[0]["num_examples"] == 8

    assert run_u.returncode == 0, run_u.stdout[-3000:] + run_u.stderr[-6000:]
    assert "packing: " not in run_u.stdout and "prepared data cached: " not in run_u.stderr
    assert [(r["formatted"], r["stored"]) for r in unpacked] == [(0, 0), (0, 0)]  # the second run prepares nothing
    assert {r["examples"] for r in unpacked} == {packed[0]["examples"]}

    p, u = _step(packed), _step(unpacked)
    assert p["loss"] == pytest.approx(u["loss"], rel=1e-6) and p["loss"] > 0
    assert p["grad_norm"] == pytest.approx(u["grad_norm"], rel=1e-6) and p["grad_norm"] > 0
    assert p["num_tokens"] == u["num_tokens"] == packed[0]["num_tokens"]  # every example's tokens, once
    b_p, b_u = _lora_b(out_p), _lora_b(out_u)
    assert b_p.keys() == b_u.keys() and any(t.abs().max() > 0 for t in b_u.values())
    for key, t in b_u.items():
        torch.testing.assert_close(b_p[key], t, rtol=1e-3, atol=1e-6, msg=key)
    meta = json.loads((out_p / "vlmtune.json").read_text())
    assert meta["distributed"] == {"deepspeed": stage, "world_size": 2}
