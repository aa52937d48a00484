"""`method: contrastive` end to end: recipe -> pairs -> dual encoder with LoRA -> Trainer -> output folder.

The output folder follows SFT's rules (run_folder.py): an earlier run is replaced only with --overwrite, once the
new one is complete. Checkpoints are written whole as output_dir/checkpoints/checkpoint-N (checkpoints.py), so a
killed run resumes (train.resume_from_checkpoint: latest | PATH) to the adapter the uninterrupted run makes;
train.best_metric keeps the checkpoint with the best logged recall. The final files (the adapter with the
projections, temperature.safetensors, the processor, recipe.yaml, train_results.json, the training curves) are
moved in whole, vlmtune.json last, listing them. `recall_before` / `recall` in both JSON files are the eval split's
recall@k before and after (after: the best checkpoint's with train.best_metric).

Under DeepSpeed (distributed.deepspeed) the embeddings are still gathered with their gradients across processes.
Each process loads the model whole, its 0-dim weights (CLIP's logit_scale) made 1-dim, which DeepSpeed needs to
broadcast or partition them; ZeRO-3's engine partitions the weights as training starts (not zero.Init as they are
read, which cannot take a 0-dim weight), and every save gathers the trained weights whole first.

`vlmtune train` reaches it through contrastive/entry.py, the module methods/contrastive.py names: it takes a
loaded Recipe and shares the run-folder and checkpoint rules of SFT (run_folder.py, checkpoints.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..embedding import registry, tiny
from ..embedding.load import load_base, model_type_of
from ..errors import VlmtuneError
from ..quantization import prepare_quantized
from ..run_metadata import METADATA_FILE
from .model import DualEncoderLoss, attach_lora, scalars_as_vectors, trainable_names
from .pairs import PairDataset, read_pairs
from .recall import pair_recall
from .weights import save_trained, trained_state

RESULTS_FILE = "train_results.json"


def family_of(recipe):
    """The embedding family of the recipe's model, checked against model.family."""
    name = recipe.model.name_or_path
    found = registry.for_model_type(model_type_of(name), where=name)
    if recipe.model.family not in ("auto", found.name):
        raise VlmtuneError(f"model.family: {recipe.model.family!r}, but {name} is a {found.name} model (model_type "
                           f"{found.model_types[0]}); set model.family: auto or {found.name}")
    return found


def loss_for(recipe, family) -> str:
    """contrastive.loss, auto meaning the family's own."""
    return family.loss if recipe.contrastive.loss == "auto" else recipe.contrastive.loss


def _uses_bf16(recipe) -> bool:
    t = recipe.train
    cuda = torch.cuda.is_available() and not t.use_cpu
    return cuda and torch.cuda.is_bf16_supported() and recipe.model.dtype in ("auto", "bfloat16")


def _training_args(recipe, checkpoints: Path, has_eval: bool, deepspeed: dict | None = None):
    import transformers

    from .. import best_checkpoint

    t = recipe.train
    cuda = torch.cuda.is_available() and not t.use_cpu
    evaluating = has_eval and t.eval_steps is not None
    return transformers.TrainingArguments(
        output_dir=str(checkpoints), num_train_epochs=t.num_train_epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        weight_decay=t.weight_decay, lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_ratio,  # a fraction below 1 is a ratio in transformers 5
        max_grad_norm=t.max_grad_norm, optim=t.optim, logging_steps=t.logging_steps, seed=t.seed,
        report_to=t.report_to, use_cpu=t.use_cpu or not cuda, bf16=_uses_bf16(recipe), deepspeed=deepspeed,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit, save_only_model=False,
        eval_strategy="steps" if evaluating else "no", eval_steps=t.eval_steps if evaluating else None,
        remove_unused_columns=False, label_names=[], disable_tqdm=False, dataloader_num_workers=recipe.data.num_workers or 0,
        # every process must hold the same number of rows when the embeddings are gathered
        dataloader_drop_last=int(os.environ.get("WORLD_SIZE", "1")) > 1, ddp_find_unused_parameters=False,
        **best_checkpoint.trainer_args(t),
    )  # fmt: skip


@dataclass
class ContrastiveRun:
    """A run ready to train: its trainer over the LoRA model, and what the output folder records."""

    recipe: object  # the loaded Recipe (method contrastive)
    family: object
    loss: str
    peft_model: object
    processor: object
    trainer: object
    eval_pairs: list
    recall_before: dict


def build_run(r, checkpoints: Path, log=print, resume: str | None = None) -> ContrastiveRun:
    """Pairs, model with LoRA, base recall on the eval pairs, and the Trainer saving checkpoints under
    `checkpoints`; `resume`: the checkpoint the run continues (refused when the recipe trains otherwise)."""
    import transformers

    from .resume import check_same_run, run_identity
    from .trainer import ContrastiveTrainer, EpochCaptions, PairCollator, TemperatureInStep
    from .zero import deepspeed_config, prepare_process

    family = family_of(r)
    loss = loss_for(r, family)
    train_pairs = read_pairs(r.data.train, r.data)
    eval_pairs = read_pairs(r.data.eval, r.data) if r.data.eval else []
    identity = run_identity(r, train_pairs)
    if resume is not None:
        check_same_run(resume, identity)
    quantized = r.quantization.mode != "none"
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() and not r.train.use_cpu else "cpu"
    tiny.resolve(r.model.name_or_path)  # a builtin tiny model is built before DeepSpeed is set up
    ds_config = deepspeed_config(r, device, _uses_bf16(r))
    prepare_process(r, ds_config)  # the process group, before the model and the Trainer's arguments
    model, processor, _ = load_base(r.model.name_or_path, device=device if quantized else None,
                                    quantization=r.quantization if quantized else None)
    if quantized:
        prepare_quantized(model, gradient_checkpointing=False)
    if ds_config is not None:
        scalars_as_vectors(model)  # the engine broadcasts (ZeRO-3: partitions) every weight: none may be 0-dim
    transformers.set_seed(r.train.seed)  # the LoRA init, as the Trainer seeds the rest
    peft_model = attach_lora(model, family, r.lora, r.lora.towers)
    log(f"contrastive LoRA on {r.model.name_or_path} ({family.name}, loss {loss}, towers {r.lora.towers}"
        f"{', DeepSpeed ' + r.distributed.deepspeed if ds_config else ''}): {len(train_pairs)} train / "
        f"{len(eval_pairs)} eval pairs, {len(trainable_names(peft_model))} trainable tensors")
    batch = r.contrastive.eval_batch_size
    before = pair_recall(peft_model.eval(), processor, eval_pairs, batch) if eval_pairs else {}
    args = _training_args(r, checkpoints, bool(eval_pairs), ds_config)  # registers its DeepSpeed config
    dataset = PairDataset(train_pairs, seed=r.train.seed)
    trainer = ContrastiveTrainer(
        model=DualEncoderLoss(peft_model.train(), family, loss, r.contrastive.gather),
        args=args, train_dataset=dataset,
        eval_dataset=PairDataset(eval_pairs) if eval_pairs else None,  # the Trainer asks; evaluate() reads eval_pairs
        data_collator=PairCollator(processor, family), callbacks=[EpochCaptions(dataset), TemperatureInStep()],
        family=family, eval_pairs=eval_pairs, processor=processor, eval_batch_size=batch,
    )  # fmt: skip
    trainer.run_identity = identity  # saved into each checkpoint for the resume check
    return ContrastiveRun(r, family, loss, peft_model, processor, trainer, eval_pairs, before)


def train_contrastive(recipe, overwrite: bool = False, log=print) -> Path:
    """Train a contrastive LoRA adapter from a loaded recipe (vlmtune.load_recipe, method contrastive); returns
    the output folder."""
    return run_contrastive(recipe, overwrite, log)[0]


def run_contrastive(recipe, overwrite: bool = False, log=print) -> tuple[Path, dict]:
    """(output folder, train_results.json's metrics) of a contrastive run (the metrics on every process)."""
    from .. import best_checkpoint, checkpoints

    folder, resume = checkpoints.folder_and_resume(recipe, overwrite, log)
    run = build_run(recipe, folder.checkpoints, log, resume)
    folder.create()
    trainer = run.trainer
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = {**result.metrics, "train_loss": result.training_loss}
    if trainer.resumed_at_end:
        log(f"{resume} is at the last step: nothing was left to train; the run's outputs are written from it")
        metrics = checkpoints.logged_train_metrics(resume)
    best = best_checkpoint.reported(trainer, log)  # the checkpoint whose weights the model holds now
    step = best[best_checkpoint.KEY]["step"] if best else trainer.state.global_step
    if run.eval_pairs and not [h for h in trainer.recall_history if h["step"] == step]:
        trainer.evaluate()  # the last step, unless train.eval_steps just did
    history = trainer.recall_history
    after = next(({k: v for k, v in h.items() if k != "step"} for h in reversed(history) if h["step"] == step), {})
    results = {**metrics, "global_step": trainer.state.global_step, "loss": run.loss,
               "recall_before": run.recall_before, "recall": after, "recall_history": history,
               "trainable": trainable_names(run.peft_model), **best}
    if after:
        log(f"recall@1 image->text {run.recall_before.get('i2t_r@1', 0):.3f} -> {after['i2t_r@1']:.3f}, "
            f"text->image {run.recall_before.get('t2i_r@1', 0):.3f} -> {after['t2i_r@1']:.3f}")
    state = trained_state(run.peft_model)  # ZeRO-3: gathered by every process
    if trainer.is_world_process_zero():
        _write_outputs(folder.work, run, results, state)
        folder.finish(log)
        log(f"wrote {folder.final}")
    trainer.accelerator.wait_for_everyone()  # every process returns once the folder is in place
    return folder.final, results


def _write_outputs(out: Path, run: ContrastiveRun, results: dict, state: dict | None) -> None:
    """The run's files staged inside `out`, moved in whole, vlmtune.json last (the rules of training.write_outputs:
    a kill mid-move leaves the names known as the run's own)."""
    import yaml

    from .. import best_checkpoint, curves
    from ..distributed import world_size
    from ..run_folder import STAGING_PREFIX, move_in

    r, family = run.recipe, run.family
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        save_trained(staging, run.peft_model, family, state)
        run.processor.save_pretrained(staging)
        (staging / "recipe.yaml").write_text(yaml.safe_dump(r.to_dict(), sort_keys=False), encoding="utf-8")
        (staging / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        curves.write(run.trainer.state.log_history, staging, title=out.name)
        meta = {"method": "contrastive", "family": family.name, "base_model": r.model.name_or_path,
                "base_path": tiny.resolve(r.model.name_or_path), "loss": results["loss"], "towers": r.lora.towers,
                "lora": {"r": r.lora.r, "alpha": r.lora.alpha}, "quantization": r.quantization.mode,
                "distributed": {"deepspeed": r.distributed.deepspeed, "world_size": world_size()},
                "recall_before": results["recall_before"], "recall": results["recall"],
                **best_checkpoint.entry(results)}
        # listed too: what the folder already holds (checkpoints, logs) and vlmtune.json itself
        kept = {*(p.name for p in out.iterdir() if not p.name.startswith(".")), METADATA_FILE}
        move_in(out, staging, meta, also_listed=kept)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
