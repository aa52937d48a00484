"""DPO under DeepSpeed on CPU processes (torchrun, gloo, DeepSpeed's CPU accelerator): ZeRO-2 on 2 processes logs
the losses, rewards and margins a single process logs on the same global batches and writes an adapter that reloads
to the in-training logits; ZeRO-3 keeps the vision tower in step when one rank's pairs have no image, and its
reference (the adapter disabled) runs on the partitioned weights. Both 2-process runs share one launch."""

from __future__ import annotations

import json

import pytest
import torch

from .launch_scenarios import Scenario, launch, run_one, selected
from .test_deepspeed import SHAPES, assert_adapter_reloads_with_training_logits, shm_op_built  # noqa: F401

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.usefixtures("shm_op_built"),  # DeepSpeed's CPU op built once, before the ranks start
              pytest.mark.multiprocess]  # several processes: make test-multiprocess

# rows in file order; 2 ranks x 2 pairs a step, sequential sampling: step 1 gives rank 0 two pairs with an image
# and rank 1 two text-only pairs, step 2 the reverse; one process with 4 pairs a step sees the same global batches
PATTERN = "IITTTTII"
LOGGED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
          "logps/rejected")


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    plain = iter((SHAPES / "preference-train.jsonl").read_text().splitlines())
    lines = []
    for i, c in enumerate(PATTERN):
        row = json.loads(next(plain))
        if c == "I":
            prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}]
            lines.append({"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"],
                          "images": [row["image"]]})
        else:
            lines.append({"prompt": f"Name shape {i}.", "chosen": f"Shape {i} is a square.",
                          "rejected": f"Shape {i} is a cloud."})
    path = tmp_path_factory.mktemp("dpo-mp") / "pairs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def dpo_recipe(folder, data, per_device=2):
    """2 DPO steps of `per_device` pairs a process on the tiny Qwen2-VL, output in folder/out."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(
        "model: {name_or_path: 'builtin:tiny-qwen2-vl'}\nmethod: dpo\ndpo: {beta: 0.1}\n"
        f"data: {{train: '{data}', image_root: '{SHAPES}', format: preference, max_pixels: 12544, num_workers: 0}}\n"
        "lora: {dropout: 0.0}\n"
        f"train: {{max_steps: 2, per_device_train_batch_size: {per_device}, gradient_accumulation_steps: 1, "
        "learning_rate: 0.01, warmup_ratio: 0.0, logging_steps: 1, save_steps: 1000, use_cpu: true, "
        "gradient_checkpointing: false}\n"
        f"output_dir: '{folder / 'out'}'\n")
    return folder / "recipe.yaml"


RUNS = ["zero2", "zero3"]


@pytest.fixture(scope="module")
def runs(request, pair_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo-runs")
    two = ("distributed.num_processes=2",)
    scenarios = [Scenario(stage, ["dpo", str(dpo_recipe(root / stage, pair_data)), f"distributed.deepspeed={stage}",
                                  *two], root / stage / "out") for stage in selected(request, RUNS)]
    return launch(root, scenarios, timeout=900)


@pytest.fixture(scope="module")
def one_process(pair_data, tmp_path_factory):
    """The single-process reference of the ZeRO-2 run: the same global batches."""
    folder = tmp_path_factory.mktemp("dpo-one")
    return run_one(folder, ["dpo", str(dpo_recipe(folder, pair_data, per_device=4))])


def logged(rank: dict) -> list[dict]:
    return [{k: h[k] for k in LOGGED} for h in rank["log_history"] if "rewards/margins" in h]


@pytest.mark.slow
@pytest.mark.multiprocess_ci
@pytest.mark.scenario("zero2")
def test_zero2_two_processes_log_what_one_process_logs(runs, one_process):
    run = runs["zero2"]
    out, probe, ranks = run.out, run.probe, run.ranks
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "torch.distributed.run" in run.launch_stderr and run.stdout.count("saved adapter") == 1
    assert len(ranks) == 2 and all(r["world_size"] == 2 and r["ds_config"]["zero_optimization"]["stage"] == 2
                                   for r in ranks)
    # per step the reference forward (adapter disabled), then the policy's: a text-only step on each rank
    assert [r["forwards"] for r in ranks] == [[True, True, False, False], [False, False, True, True]]
    assert all(r["dummy_calls"] >= 1 for r in ranks)
    one_out, one = one_process.out, one_process.ranks
    assert one_process.returncode == 0, one_process.stdout[-3000:] + one_process.stderr[-6000:]
    two_logs, one_logs = logged(ranks[0]), logged(one[0])
    assert len(two_logs) == len(one_logs) == 2
    for a, b in zip(two_logs, one_logs, strict=True):
        for k in LOGGED:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, two_logs, one_logs)
    assert two_logs[1]["rewards/margins"] != 0.0  # the second step's policy moved away from the reference
    meta = json.loads((out / "vlmtune.json").read_text())
    assert meta["method"] == "dpo" and meta["distributed"] == {"deepspeed": "zero2", "world_size": 2}
    assert_adapter_reloads_with_training_logits(out, probe)
    from safetensors.torch import load_file

    two_w, one_w = load_file(out / "adapter_model.safetensors"), load_file(one_out / "adapter_model.safetensors")
    assert two_w.keys() == one_w.keys()
    for k in two_w:
        torch.testing.assert_close(two_w[k], one_w[k], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
@pytest.mark.scenario("zero3")
def test_zero3_two_processes_reference_and_dummy_image_on_partitioned_weights(runs):
    """The reference pass (adapter disabled) and the policy pass each gather the partitioned weights; the rank
    whose pairs have no image runs the dummy image in both, so the ranks' collectives stay in step."""
    run = runs["zero3"]
    out, probe, ranks = run.out, run.probe, run.ranks
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert len(ranks) == 2 and all(r["zero3"] and r["world_size"] == 2 for r in ranks)
    assert [r["forwards"] for r in ranks] == [[True, True, False, False], [False, False, True, True]]
    assert all(r["dummy_calls"] >= 2 for r in ranks)  # the reference's and the policy's forward
    logs = logged(ranks[0])
    assert len(logs) == 2 and logs[0]["rewards/margins"] == 0.0 and logs[1]["rewards/margins"] != 0.0
    assert_adapter_reloads_with_training_logits(out, probe)
