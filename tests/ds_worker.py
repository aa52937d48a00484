"""`vlmtune` CLI with probes, for the multi-process tests (tests/test_deepspeed.py).

    python tests/ds_worker.py sft recipe.yaml distributed.num_processes=2 ...

Run outside a launcher it goes through `vlmtune sft`'s own re-launch (torchrun re-runs this script in each
process). In each process it records, under $VLMTUNE_PROBE_DIR:
- rank<N>.json: the data rows this rank fetched (per fetch), per forward whether the batch had images, how often the
  dummy image ran, and the world size;
- logits.pt (rank 0): logits of the in-training model on fixed token ids, computed by every rank
  together right before the adapter is gathered and saved;
- in rank<N>.json also: how many rows this rank formatted and prepared-data entries it stored, a digest of
  the training examples it holds, the trainer's log history and its vision cache's counts.
Probe options (environment): VLMTUNE_PROBE_SEQUENTIAL=1 feeds rows in file order (so the test data decides
which rank gets a text-only batch); VLMTUNE_PROBE_NO_DUMMY=1 leaves the dummy image out (shows the trap).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

PROBE_IDS = [[1, 5, 9, 13, 17, 21, 25, 29]]


def install_probes(probe_dir: Path) -> None:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from vlmtune import distributed, training
    from vlmtune.data import dataset, prepare, prepared_cache

    record = {"sources": [], "forwards": [], "dummy_calls": 0, "formatted": 0, "stored": 0}
    rank = int(os.environ.get("RANK", "0"))
    hooks = {}
    install_data_probes(record, training, prepare, prepared_cache, hooks)

    original_transform = dataset.VisionTransform.__call__

    def transform(self, batch):
        record["sources"].append(list(batch["source"]))  # one entry per fetch
        return original_transform(self, batch)

    dataset.VisionTransform.__call__ = transform

    original_keep = training.keep_vision_in_step

    def keep(model, family, processor):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model

        def seen(module, args, kwargs):
            if module.training:
                record["forwards"].append(kwargs.get("pixel_values") is not None)

        base.register_forward_pre_hook(seen, with_kwargs=True)
        if os.environ.get("VLMTUNE_PROBE_NO_DUMMY") == "1":
            return None
        hooks["vision"] = original_keep(model, family, processor)
        return hooks["vision"]

    training.keep_vision_in_step = keep

    if os.environ.get("VLMTUNE_PROBE_SEQUENTIAL") == "1":
        original_config = training.method_args

        def method_args(*args, **kwargs):
            config = original_config(*args, **kwargs)
            config.train_sampling_strategy = "sequential"
            return config

        training.method_args = method_args

    original_gather = training.gathered_adapter_state

    def gather(model):
        model.eval()
        with torch.no_grad():
            ids = torch.tensor(PROBE_IDS)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().cpu()
        if rank == 0:
            torch.save(logits, probe_dir / "logits.pt")
        record["dummy_calls"] = hooks["vision"].calls if hooks.get("vision") else 0
        record["world_size"] = distributed.world_size()
        record["zero3"] = is_deepspeed_zero3_enabled()
        from accelerate.state import AcceleratorState
        from transformers.integrations.deepspeed import deepspeed_config

        record["log_history"] = hooks["trainer"].state.log_history if hooks.get("trainer") else []
        record["vision_cache"] = hooks["trainer"].vision_cache.metrics() if hooks.get("trainer") else {}
        record["distributed_type"] = str(AcceleratorState().distributed_type)
        record["ds_config"] = deepspeed_config()
        (probe_dir / f"rank{rank}.json").write_text(json.dumps(record))
        return original_gather(model)

    training.gathered_adapter_state = gather


def install_data_probes(record: dict, training, prepare, prepared_cache, hooks: dict) -> None:
    """Count rows formatted and entries stored; digest the plan's training examples; keep the trainer."""
    import hashlib

    original_format, original_store = prepare.format_example, prepared_cache.store

    def format_example(*args, **kwargs):
        record["formatted"] += 1
        return original_format(*args, **kwargs)

    def store(*args, **kwargs):
        record["stored"] += 1
        return original_store(*args, **kwargs)

    prepare.format_example, prepared_cache.store = format_example, store
    original_plan, original_build = training.plan_run, training.build_trainer

    def plan_run(recipe):
        plan = original_plan(recipe)
        shown = [[e.source, e.input_ids, e.labels, [list(g) for g in e.grids]] for e in plan.train.examples]
        record["examples"] = hashlib.sha256(json.dumps(shown).encode()).hexdigest()
        record["num_examples"], record["num_tokens"] = len(shown), plan.train.num_tokens
        return plan

    def build_trainer(*args, **kwargs):
        trainer, report = original_build(*args, **kwargs)
        hooks["trainer"] = trainer
        return trainer, report

    training.plan_run, training.build_trainer = plan_run, build_trainer


def main() -> int:
    from vlmtune import cli, distributed

    probe = os.environ.get("VLMTUNE_PROBE_DIR")
    if probe and distributed.under_launcher():
        Path(probe).mkdir(parents=True, exist_ok=True)
        install_probes(Path(probe))
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
