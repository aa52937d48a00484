"""Build the TRL SFTTrainer from a checked plan, train, and write adapter + processor + metadata."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

import torch

from . import __version__, best_checkpoint, curves, eval_during_training, memory_probe
from .config import Recipe, dump
from .distributed.launch import is_main_process
from .distributed.process import (
    apply_liger_kernels,
    prepare_deepspeed_process,
    set_thread_counts,
    torch_threads,
)
from .distributed.zero3 import gathered_adapter_state, keep_vision_in_step
from .errors import VlmtuneError
from .loader_sizing import Sizing, idle_cpus, limit_loader_threads, local_processes
from .loader_sizing import size as loader_size
from .methods import Method
from .methods import get as method_for
from .modeling import attach_lora, format_report, load_base_model, pixel_bounds, trainable_report
from .preflight import Plan, plan_run
from .run_folder import RESULTS_FILE, STAGING_PREFIX
from .vision_cache_prepass import VisionCache, VisionCalls
from .vision_cache_prepass import setup as vision_cache_setup


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict
    trainable: dict = field(default_factory=dict)


def loader_sizing(plan: Plan, idle: float | None = None) -> Sizing:
    """DataLoader workers, prefetch, pinned memory and torch threads for this rank (loader_sizing.py); `idle`: the
    CPUs found idle, which lowers the threads when other work holds the rest."""
    d = plan.recipe.data
    current, default = torch_threads()
    processes = local_processes(plan.world_size, plan.recipe.distributed.num_nodes)
    return loader_size(d.num_workers, d.prefetch_factor, plan.runtime.device, processes,
                       current_threads=current, default_threads=default, idle=idle)


def fixed_checkpointing(plan: Plan) -> memory_probe.Checkpointing | None:
    """Gradient checkpointing where the recipe or the run decides it; None: auto measures a step (memory_probe.py)."""
    return memory_probe.fixed_choice(plan.recipe.train.gradient_checkpointing, plan.deepspeed is not None,
                                     plan.zero_stage, plan.recipe.quantization.mode != "none")


def method_args(plan: Plan, checkpoint_dir: Path):
    """The TRL config of the plan's method (its own arguments on top of trainer_args')."""
    from functools import partial

    return method_for(plan.recipe.method).trainer_args(partial(trainer_args, plan, checkpoint_dir), plan.recipe)


sft_config = method_args  # the name callers used when SFT was the only method


def trainer_args(plan: Plan, checkpoint_dir: Path, config_cls, **extra):
    """A TRL config (`config_cls`) with the arguments every method shares, plus the method's own (`extra`). Sets no
    process-wide state of vlmtune's own (prepare_deepspeed_process does, first); transformers registers the
    DeepSpeed config it is given, for as long as the arguments live."""
    t = plan.recipe.train
    sizing = loader_sizing(plan)
    fixed = fixed_checkpointing(plan)  # auto: off until a measured step asks for it (build_trainer)
    on_gpu = plan.runtime.device == "cuda"
    has_eval = plan.eval is not None and method_for(plan.recipe.method).size(plan.eval) > 0
    return config_cls(
        deepspeed=plan.deepspeed,
        **_checkpointing_args(config_cls, fixed is not None and fixed.enabled),
        output_dir=str(checkpoint_dir),
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy=("steps" if t.eval_steps else "epoch") if has_eval else "no",
        eval_steps=t.eval_steps,
        seed=t.seed,
        data_seed=t.seed,
        report_to=t.report_to,
        bf16=plan.runtime.dtype == torch.bfloat16 and on_gpu,
        fp16=plan.runtime.dtype == torch.float16 and on_gpu,
        use_cpu=not on_gpu,
        **extra,
        remove_unused_columns=False,
        dataloader_num_workers=sizing.workers,
        dataloader_persistent_workers=sizing.persistent_workers,
        dataloader_pin_memory=sizing.pin_memory,
        dataloader_prefetch_factor=sizing.prefetch_factor,
        save_only_model=False,
        disable_tqdm=False,
        **best_checkpoint.trainer_args(t),
    )


def _checkpointing_args(config_cls, enabled: bool) -> dict:
    """Non-reentrant checkpointing (works with a frozen vision tower), under the field names this version has."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {f"{prefix}_checkpointing": enabled,
            f"{prefix}_checkpointing_kwargs": {"use_reentrant": False} if enabled else None}


def build_trainer(plan: Plan, checkpoint_dir: Path, log=print):
    """The trainer of the recipe's method (vlmtune/methods/) for a plan: base model and LoRA (or the adapter it
    starts from), the method's dataset, collator and TRL trainer, vlmtune's guards and atomic checkpoints."""
    recipe = plan.recipe
    method = method_for(recipe.method)
    model, args, sizing, kernels, report = _policy(plan, lambda: method_args(plan, checkpoint_dir),
                                                   method.init_adapter(recipe), log)
    if method.uses_vision_cache:
        vision = vision_cache_setup(model, plan, report, args.dataloader_num_workers, log)  # the pre-pass, if on
    else:
        vision = VisionCache(False, f"not used by method {method.name}", VisionCalls(model, plan.family))
        log(f"vision feature cache: off ({vision.reason})")
    pad_id, multiple = _padding(plan)
    collator = method.collator(plan, pad_id, multiple, plan.runtime.attn_implementation)
    train_ds, eval_ds, lengths = method.datasets(plan, vision, log)
    trainer = _trainer_class(method)(
        model=model, args=args, data_collator=collator, train_dataset=train_ds, eval_dataset=eval_ds,
        processing_class=plan.processor, lengths=lengths if recipe.train.group_by_length else None,
        max_bad_samples=recipe.data.max_bad_samples, max_nonfinite_steps=recipe.train.max_nonfinite_steps, log=log,
        generation_eval=eval_during_training.setup(plan), **method.trainer_kwargs(plan, lengths))
    checkpointing = fixed_checkpointing(plan) or memory_probe.measure_for(
        trainer, train_ds, lengths, recipe.train.per_device_train_batch_size, plan.runtime.device, collator)
    log(checkpointing.line())
    # recorded in train_results.json and vlmtune.json
    trainer.fast_path = {"gradient_checkpointing": checkpointing.record(), "liger_kernel": kernels,
                         "data_loading": sizing.note}
    trainer.vision_cache = vision  # its metrics go into train_results.json
    return trainer, report


def _policy(plan: Plan, make_args, init_adapter: str | None, log):
    """(model, trainer arguments, loader sizing, liger kernels, trainable report): the base model with a fresh LoRA
    adapter, or with `init_adapter` loaded trainable."""
    deepspeed = prepare_deepspeed_process(plan)  # the steps that set process-wide state: see distributed/process.py
    sizing = loader_sizing(plan, idle_cpus())
    set_thread_counts(sizing, log)
    args = make_args()
    from transformers import set_seed

    set_seed(plan.recipe.train.seed)  # LoRA's random init happens before the Trainer seeds anything
    model = load_base_model(plan)
    del deepspeed  # loaded: from here on the Trainer's arguments keep their own DeepSpeed config registered
    kernels = apply_liger_kernels(model, plan, log)  # before LoRA wraps the layers liger patches
    model = attach_lora(model, plan) if init_adapter is None else load_trainable_adapter(model, plan, init_adapter, log)
    if plan.zero_stage == 3 or plan.world_size > 1:  # every rank runs the vision tower once per forward
        model.vlmtune_vision_in_step = keep_vision_in_step(model, plan.family, plan.processor)
    report = trainable_report(model, plan.family)
    log(format_report(report))
    if sum(t for t, _ in report.values()) == 0:
        raise VlmtuneError("nothing would be trained: no parameter requires a gradient; check lora.target_modules")
    return model, args, sizing, kernels, report


def _padding(plan: Plan) -> tuple[int, int | None]:
    tokenizer = plan.processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # multiples of 8 keep GPU matmuls on tensor-core friendly shapes
    return pad_id, 8 if plan.runtime.device == "cuda" else None


def load_trainable_adapter(model, plan: Plan, folder: str, log):
    """`folder`'s LoRA adapter on the base model, trainable; refused when it was trained on another base model."""
    from peft import PeftModel

    from .config.schema import switch
    from .modeling import prepare_quantized
    from .run_metadata import read_metadata

    meta = read_metadata(folder) if (Path(folder) / "vlmtune.json").is_file() else {}
    base = meta.get("base_model")
    if base is not None and base != plan.recipe.model.name_or_path:
        raise VlmtuneError(f"dpo.init_adapter: {folder} was trained on {base}, not on model.name_or_path "
                           f"{plan.recipe.model.name_or_path}; train from that base model, or start a fresh adapter")
    if plan.recipe.quantization.mode != "none":
        prepare_quantized(model, switch(plan.recipe.train.gradient_checkpointing) != "false")
    log(f"starting from the adapter in {folder}")
    return PeftModel.from_pretrained(model, folder, is_trainable=True)


class RunTrainer:
    """Trainer mixin of every method (first in the bases): the logged token count from the collator
    (token_count.py), DataLoader workers on one thread (loader_sizing.py), batches grouped by the lengths known
    from preparation (no pass over the images)."""

    def __init__(self, *args, lengths: list[int] | None = None, data_collator=None, **kwargs):
        from .token_count import CountingCollator

        self._lengths = lengths
        counting = CountingCollator(data_collator) if data_collator is not None else None
        super().__init__(*args, data_collator=counting, **kwargs)

    def get_train_dataloader(self):
        return limit_loader_threads(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset=None):
        return limit_loader_threads(super().get_eval_dataloader(eval_dataset))

    def _get_train_sampler(self, train_dataset=None):
        from transformers.trainer_pt_utils import LengthGroupedSampler

        if self._lengths is None:
            return super()._get_train_sampler(train_dataset)
        generator = torch.Generator().manual_seed(self.args.seed)
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=self._lengths, generator=generator)


def _trainer_class(method: Method) -> type:
    """The method's TRL trainer (its mixins, then the trainer: Method.trainer_bases) inside vlmtune's mixins:
    token count, loader threads and length-grouped batches (RunTrainer), guards, atomic checkpoints, generation
    metrics at each evaluation, TensorBoard logs in the run folder."""
    from .checkpoints import AtomicCheckpoints
    from .guards import GuardedTrainer
    from .reporting import LogsInRunFolder
    from .token_count import TokenCount

    *own, trl_trainer = method.trainer_bases()
    bases = (RunTrainer, TokenCount, GuardedTrainer, AtomicCheckpoints, *own,
             eval_during_training.GenerationMetrics, LogsInRunFolder, trl_trainer)
    return type(f"Vision{trl_trainer.__name__}", bases, {"__module__": __name__})


def metadata(plan: Plan) -> dict:
    import peft
    import transformers
    import trl

    r = plan.recipe
    return {
        "vlmtune_version": __version__,
        "family": plan.family.name,
        "model_type": plan.model_config.model_type,
        "base_model": r.model.name_or_path,
        "method": r.method,
        "quantization": r.quantization.mode,
        "dtype": str(plan.runtime.dtype).removeprefix("torch."),
        "pixel_bounds": pixel_bounds(plan.processor, plan.family),
        "train_on": r.data.train_on,
        "data": {"format": r.data.format, "columns": dict(getattr(r.data, "columns", {}) or {}),
                 "caption_prompt": getattr(r.data, "caption_prompt", None)},
        "system_prompt": r.data.system_prompt,
        "max_length": r.data.max_length,
        "distributed": {"deepspeed": r.distributed.deepspeed, "world_size": plan.world_size},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "trl": trl.__version__},
    }


def train(recipe: Recipe, log=print, overwrite: bool = False) -> TrainResult:
    """Check everything, train, and write the adapter folder; nothing half-written if interrupted.

    overwrite: replace a run already in output_dir (it stays whole until the new one is complete)."""
    from . import checkpoints, run_folder

    if not is_main_process():  # only rank 0 reports
        log = _quiet
    method = method_for(recipe.method)
    if method.own_run:  # a model that is no VLM (a dual encoder): the method's own run, same recipe and folder rules
        output_dir, metrics = import_module(method.own_run).run(recipe, log=log, overwrite=overwrite)
        return TrainResult(Path(output_dir), metrics)
    log(f"output folder: {run_folder.output_path(recipe)}")
    folder, resume = checkpoints.folder_and_resume(recipe, overwrite, log)
    plan = plan_run(recipe)
    log(f"model: {recipe.model.name_or_path} (family {plan.family.name}, {plan.runtime.device}, "
        f"{str(plan.runtime.dtype).removeprefix('torch.')}, attention {plan.runtime.attn_implementation}, "
        f"quantization {recipe.quantization.mode})")
    log("train data: " + plan.train.summary())
    if plan.eval is not None:
        log("eval data: " + plan.eval.summary())
    if resume is not None:
        checkpoints.check_same_run(resume, plan)
    folder.create()
    trainer, report = build_trainer(plan, folder.checkpoints, log)
    trainer.run_identity = checkpoints.run_identity(plan)  # saved into each checkpoint for resume checks
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(output.metrics)
    if trainer.resumed_at_end:
        log(f"{resume} is at the last step: nothing was left to train; the run's outputs are written from it")
        metrics = checkpoints.logged_train_metrics(resume)
    metrics["global_step"] = trainer.state.global_step
    metrics.update(best_checkpoint.reported(trainer, log))  # the checkpoint whose weights the model holds now
    metrics["fast_path"] = trainer.fast_path
    metrics.update(_data_metrics(plan, metrics))
    metrics["wall_seconds"] = time.perf_counter() - start
    if torch.cuda.is_available():
        metrics["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
    if plan.eval is not None and method_for(recipe.method).size(plan.eval):
        metrics.update(_final_eval(trainer))
    metrics.update(trainer.bad_sample_report())  # collective under multi-process: every rank
    metrics.update(trainer.vision_cache.metrics())
    adapter_state = gathered_adapter_state(trainer.model)  # ZeRO-3: collective, every rank; else None
    if trainer.is_world_process_zero():
        write_outputs(trainer, plan, folder.work, metrics, adapter_state=adapter_state)
        folder.finish(log)
        log(f"saved adapter, processor and metadata to {folder.final}")
    return TrainResult(folder.final, metrics, {k: v[0] for k, v in report.items()})


def _quiet(*args, **kwargs) -> None:
    pass


def _final_eval(trainer) -> dict:
    """Eval metrics of the weights written: the trainer's own at the last (best) step, else one more pass."""
    best = best_checkpoint.record(trainer)
    step = best["step"] if best else trainer.state.global_step
    logged = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == step]
    if logged:
        return {k: v for k, v in logged[-1].items() if k.startswith("eval_")}
    return trainer.evaluate()


def _data_metrics(plan: Plan, metrics: dict) -> dict:
    epochs = metrics.get("epoch", 1.0) or 1.0
    runtime = metrics.get("train_runtime") or 0.0
    counts = method_for(plan.recipe.method).data_metrics(plan.train)
    tokens, supervised = counts["train_tokens_per_epoch"], counts["train_supervised_tokens_per_epoch"]
    n = max(counts["train_examples"], 1)
    seen = epochs * n
    return {
        **counts,
        "tokens_per_second": tokens * seen / n / runtime if runtime else 0.0,
        "supervised_tokens_per_second": supervised * seen / n / runtime if runtime else 0.0,
    }


def write_outputs(trainer, plan: Plan, out: Path, metrics: dict, adapter_state: dict | None = None) -> None:
    """Adapter, processor, resolved recipe, metrics, then metadata last, each moved into place whole.

    adapter_state: the adapter weights gathered from every ZeRO-3 rank (else read from the model)."""
    from .checkpoints import adapter_bytes
    from .disk import check_space, full_disk_as_error
    from .run_folder import move_in

    needed = adapter_bytes(trainer.model) + 16 * 2**20  # and the processor's files (tokenizer: a few MB)
    what = f"the adapter was not written to {out}"
    check_space(out, needed, what)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        with full_disk_as_error(out, needed, what, cleanup=lambda: shutil.rmtree(staging, ignore_errors=True)):
            if adapter_state is not None:
                trainer.model.save_pretrained(staging, state_dict=adapter_state)
            else:
                trainer.model.save_pretrained(staging)
            plan.processor.save_pretrained(staging)
            (staging / "recipe.yaml").write_text(dump(plan.recipe), encoding="utf-8")
            (staging / RESULTS_FILE).write_text(json.dumps(metrics, indent=2, default=str), encoding="utf-8")
            curves.write(trainer.state.log_history, staging, title=str(out.name))
            meta = metadata(plan)
            meta["fast_path"] = getattr(trainer, "fast_path", {})
            meta.update(best_checkpoint.entry(metrics))
            move_in(out, staging, meta)  # "files": what this run wrote; --overwrite refuses to delete anything else
    finally:
        shutil.rmtree(staging, ignore_errors=True)
