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
With $VLMTUNE_PROBE_SCENARIOS (tests/launch_scenarios.py) one launch runs several runs in turn (run_scenarios).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

PROBE_IDS = [[1, 5, 9, 13, 17, 21, 25, 29]]


# the probes' state: reset for each run when one launch runs several (begin_run)
STATE: dict = {}


def begin_run(probe_dir: Path) -> None:
    probe_dir.mkdir(parents=True, exist_ok=True)
    STATE.update(dir=probe_dir, hooks={},
                 record={"sources": [], "forwards": [], "dummy_calls": 0, "formatted": 0, "stored": 0})


def install_probes(probe_dir: Path) -> None:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from vlmtune import distributed, training
    from vlmtune.data import dataset, prepare, prepared_cache

    begin_run(probe_dir)
    rank = int(os.environ.get("RANK", "0"))
    install_data_probes(training, prepare, prepared_cache)

    original_transform = dataset.VisionTransform.__call__

    def transform(self, batch):
        STATE["record"]["sources"].append(list(batch["source"]))  # one entry per fetch
        return original_transform(self, batch)

    dataset.VisionTransform.__call__ = transform

    original_keep = training.keep_vision_in_step

    def keep(model, family, processor):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        forwards = STATE["record"]["forwards"]

        def seen(module, args, kwargs):
            if module.training:
                forwards.append(kwargs.get("pixel_values") is not None)

        base.register_forward_pre_hook(seen, with_kwargs=True)
        if os.environ.get("VLMTUNE_PROBE_NO_DUMMY") == "1":
            return None
        STATE["hooks"]["vision"] = original_keep(model, family, processor)
        return STATE["hooks"]["vision"]

    training.keep_vision_in_step = keep

    original_config = training.method_args

    def method_args(*args, **kwargs):
        config = original_config(*args, **kwargs)
        if os.environ.get("VLMTUNE_PROBE_SEQUENTIAL") == "1":
            config.train_sampling_strategy = "sequential"
        return config

    training.method_args = method_args

    original_gather = training.gathered_adapter_state

    def gather(model):
        record, hooks = STATE["record"], STATE["hooks"]
        model.eval()
        with torch.no_grad():
            ids = torch.tensor(PROBE_IDS)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().cpu()
        if rank == 0:
            torch.save(logits, STATE["dir"] / "logits.pt")
        record["dummy_calls"] = hooks["vision"].calls if hooks.get("vision") else 0
        record["world_size"] = distributed.world_size()
        record["zero3"] = is_deepspeed_zero3_enabled()
        from accelerate.state import AcceleratorState
        from transformers.integrations.deepspeed import deepspeed_config

        record["log_history"] = hooks["trainer"].state.log_history if hooks.get("trainer") else []
        record["vision_cache"] = hooks["trainer"].vision_cache.metrics() if hooks.get("trainer") else {}
        record["distributed_type"] = str(AcceleratorState().distributed_type)
        record["ds_config"] = deepspeed_config()
        (STATE["dir"] / f"rank{rank}.json").write_text(json.dumps(record))
        return original_gather(model)

    training.gathered_adapter_state = gather


def install_data_probes(training, prepare, prepared_cache) -> None:
    """Count rows formatted and entries stored; digest the plan's training examples; keep the trainer."""
    import hashlib

    original_format, original_store = prepare.format_example, prepared_cache.store

    def format_example(*args, **kwargs):
        STATE["record"]["formatted"] += 1
        return original_format(*args, **kwargs)

    def store(*args, **kwargs):
        STATE["record"]["stored"] += 1
        return original_store(*args, **kwargs)

    prepare.format_example, prepared_cache.store = format_example, store
    original_plan, original_build = training.plan_run, training.build_trainer

    def plan_run(recipe):
        plan = original_plan(recipe)
        shown = [[e.source, e.input_ids, e.labels, [list(g) for g in e.grids]] for e in plan.train.examples]
        record = STATE["record"]
        record["examples"] = hashlib.sha256(json.dumps(shown).encode()).hexdigest()
        record["num_examples"], record["num_tokens"] = len(shown), plan.train.num_tokens
        return plan

    def build_trainer(*args, **kwargs):
        trainer, report = original_build(*args, **kwargs)
        STATE["hooks"]["trainer"] = trainer
        return trainer, report

    training.plan_run, training.build_trainer = plan_run, build_trainer


def run_scenarios(spec_path: Path) -> int:
    """Each run of $VLMTUNE_PROBE_SCENARIOS (tests/launch_scenarios.py) in turn, in this process: its environment,
    probes and output files its own; the first that fails ends the launch."""
    from vlmtune import cli

    rank = int(os.environ["RANK"])
    spec = json.loads(spec_path.read_text())
    install_probes(Path(spec[0]["probe"]))
    base_env = dict(os.environ)
    for run in spec:
        logs = Path(run["logs"])
        logs.mkdir(parents=True, exist_ok=True)
        os.environ.clear()
        os.environ.update(base_env, **run["env"])
        begin_run(Path(run["probe"]))
        code = captured(lambda argv=run["argv"]: cli.main(argv), logs / f"rank{rank}")
        (logs / f"rank{rank}.tmp").write_text(str(code))
        (logs / f"rank{rank}.tmp").replace(logs / f"rank{rank}.exit")
        if code != 0:
            os._exit(code)  # the other rank may wait in a collective that never comes: torchrun ends it
        forget_run()
    return 0


def captured(call, stem: Path) -> int:
    """call() with this process's stdout and stderr (file descriptors 1 and 2) written to stem.out / stem.err."""
    import traceback

    saved = []
    for fd, suffix in ((1, "out"), (2, "err")):
        sys.stdout.flush(), sys.stderr.flush()
        saved.append(os.dup(fd))
        target = os.open(f"{stem}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    try:
        code = call()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 (a crash is this run's result; the test shows the traceback)
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        for fd, old in zip((1, 2), saved, strict=True):
            os.dup2(old, fd)
            os.close(old)
    return code


def forget_run() -> None:
    """Drop the finished run's process-wide state, so that the next Trainer sets up its own DeepSpeed plugin."""
    import gc

    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state()  # the process group (PartialState) stays
    GradientState._reset_state()
    unset_hf_deepspeed_config()
    STATE.clear()
    gc.collect()
    torch.distributed.barrier()


def main() -> int:
    from vlmtune import cli, distributed

    scenarios = os.environ.get("VLMTUNE_PROBE_SCENARIOS")
    if scenarios and distributed.under_launcher():
        return run_scenarios(Path(scenarios))
    probe = os.environ.get("VLMTUNE_PROBE_DIR")
    if probe and distributed.under_launcher():
        install_probes(Path(probe))
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
