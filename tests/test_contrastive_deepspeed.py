"""method contrastive under DeepSpeed on 2 CPU processes (torchrun, gloo, DeepSpeed's CPU accelerator): ZeRO-2 logs
the losses and writes the adapter a single process makes on the same global batches, each process's loss is over
the negatives gathered from both, and a run killed after a checkpoint resumes to the same adapter; ZeRO-3 trains the
partitioned towers (LoRA and logit_scale move) and its gathered adapter reloads to the in-training embeddings. Each
launch also saves a complete checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from .test_deepspeed import ROOT, shm_op_built  # noqa: F401

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.usefixtures("shm_op_built"), pytest.mark.multiprocess, pytest.mark.slow]

TRAINED = ("adapter_model.safetensors", "temperature.safetensors")
TRAIN = {"max_steps": 3, "gradient_accumulation_steps": 1, "learning_rate": 5e-3, "lr_scheduler_type": "linear",
         "warmup_ratio": 0.0, "logging_steps": 1, "save_steps": 2, "eval_steps": 2, "use_cpu": True,
         "report_to": ["none"]}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from vlmtune.contrastive.pairs import make_shape_captions
    from vlmtune.embedding import tiny

    tiny.resolve("builtin:tiny-clip")  # built once here, not by two ranks at once
    return make_shape_captions(tmp_path_factory.mktemp("pairs"))


def _recipe_yaml(tmp_path, pairs, per_device: int) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({
        "method": "contrastive", "model": {"name_or_path": "builtin:tiny-clip"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(pairs / "train.jsonl"), "eval": str(pairs / "eval.jsonl"), "format": "caption",
                 "num_workers": 0},
        "train": {**TRAIN, "per_device_train_batch_size": per_device}, "output_dir": str(tmp_path / "out")}))
    return str(path)


def launch(tmp_path, pairs, stage: str, *overrides: str):
    """Two processes of `vlmtune train` (its own torchrun re-launch) with 4 pairs each a step, in file order."""
    probe = tmp_path / "probe"
    env = dict(os.environ, VLMTUNE_PROBE_DIR=str(probe), VLMTUNE_PROBE_SEQUENTIAL="1", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, str(ROOT / "tests" / "contrastive_ds_worker.py"), "train", _recipe_yaml(tmp_path, pairs, 4),
           f"distributed.deepspeed={stage}", "distributed.num_processes=2", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads(p.read_text()) for p in sorted(probe.glob("rank*.json"))]
    assert len(ranks) == 2 and all(r["world_size"] == 2 for r in ranks)
    assert all(r["ds_config"]["zero_optimization"]["stage"] == int(stage[-1]) for r in ranks)
    assert all(r["zero3"] == (stage == "zero3") for r in ranks)
    out = tmp_path / "out"
    meta = json.loads((out / "vlmtune.json").read_text())
    assert meta["distributed"] == {"deepspeed": stage, "world_size": 2}
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert {*TRAINED, "trainer_state.json", "vlmtune_resume.json"} <= {p.name for p in checkpoint.iterdir()}
    assert any(p.name.startswith("global_step") for p in checkpoint.iterdir())  # the engine's own state
    assert all(t.numel() > 0 for t in load_file(checkpoint / TRAINED[0]).values())  # gathered whole
    return out, probe, ranks


def _losses(log_history) -> list[float]:
    return [h["loss"] for h in log_history if "loss" in h]


def test_zero2_equals_one_process_on_the_same_global_batches(pairs, tmp_path, monkeypatch):
    out, _, ranks = launch(tmp_path / "two", pairs, "zero2")
    from vlmtune.config import load_recipe
    from vlmtune.contrastive import train

    real_args, real_build, built = train._training_args, train.build_run, []

    def sequential(*args, **kwargs):
        made = real_args(*args, **kwargs)
        made.train_sampling_strategy = "sequential"
        return made

    monkeypatch.setattr(train, "_training_args", sequential)
    monkeypatch.setattr(train, "build_run", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    one_out, _ = train.run_contrastive(load_recipe(_recipe_yaml(tmp_path / "one", pairs, 8)), log=lambda *a: None)
    two_losses, single = _losses(ranks[0]["log_history"]), _losses(built[0].trainer.state.log_history)
    assert len(two_losses) == len(single) == 3
    assert two_losses == pytest.approx(single, rel=1e-4)
    # each process scored its 4 rows against all 8 texts (images): the mean over processes is the whole batch's
    # loss, and its own loss differs from that of its rows alone
    for step in range(3):
        gathered = [r["losses"][step] for r in ranks]
        assert np.mean(gathered) == pytest.approx(single[step], rel=1e-4)
        assert all(abs(g - r["own_rows_losses"][step]) > 1e-3 for g, r in zip(gathered, ranks, strict=True))
    two_weights = {name: load_file(out / name) for name in TRAINED}
    for name in TRAINED:
        two_w, one_w = two_weights[name], load_file(one_out / name)
        assert two_w.keys() == one_w.keys()
        for key in two_w:  # Adam's steps magnify the last bits of a few tiny gradients: the tensor, not each entry
            difference = float((two_w[key] - one_w[key]).norm() / one_w[key].norm())
            assert difference < 1e-4, (name, key, difference)
    # killed after checkpoint-2 (no vlmtune.json, no checkpoint-3 the end saved): resumed under ZeRO-2, only step 3
    # runs, to the same adapter
    (out / "vlmtune.json").unlink()
    shutil.rmtree(out / "checkpoints" / "checkpoint-3")
    out, _, ranks = launch(tmp_path / "two", pairs, "zero2", "train.resume_from_checkpoint=latest")
    assert [len(r["losses"]) for r in ranks] == [1, 1]
    for name in TRAINED:
        resumed = load_file(out / name)
        for key, value in two_weights[name].items():
            torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-7)


def test_zero3_trains_the_partitioned_towers_and_its_adapter_reloads(pairs, tmp_path):
    from vlmtune.embedding import embed_images, embed_texts, load_embedding_model

    from .contrastive_ds_worker import TEXTS, probe_images

    out, probe, ranks = launch(tmp_path, pairs, "zero3")
    losses = _losses(ranks[0]["log_history"])
    assert len(losses) == 3 and np.isfinite(losses).all()
    weights = load_file(out / TRAINED[0])
    assert any("lora_B" in k and t.abs().max() > 0 for k, t in weights.items())  # LoRA left its zero init
    base, processor, _ = load_embedding_model("builtin:tiny-clip")
    trained_scale = load_file(out / TRAINED[1])["logit_scale"]
    assert not torch.allclose(trained_scale, base.logit_scale.detach())  # the temperature trained too
    tuned, processor, _ = load_embedding_model(out)
    in_training = torch.load(probe / "embeds.pt")
    images, texts = in_training["images"].numpy(), in_training["texts"].numpy()
    np.testing.assert_allclose(embed_images(tuned, processor, probe_images()), images, atol=1e-5)
    np.testing.assert_allclose(embed_texts(tuned, processor, TEXTS), texts, atol=1e-5)
    assert not np.allclose(embed_images(base, processor, probe_images()), images, atol=1e-4)
