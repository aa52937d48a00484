"""`method: contrastive` end to end: recipe -> pairs -> dual encoder with LoRA -> Trainer -> output folder.

The folder is written whole or not at all (a hidden sibling, renamed into place): the adapter (PEFT files with the
projections), temperature.safetensors, the processor, recipe.yaml, train_results.json, the training curves and
vlmtune.json last, listing the files. `recall_before` / `recall` in both JSON files are the eval split's recall@k
before and after.

`vlmtune train` reaches it through the method registry (methods/contrastive.py), upstream of the recipe layer:
it takes a loaded Recipe and imports nothing from vlmtune.config.
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
from ..embedding.load import TEMPERATURE_FILE, load_base, model_type_of
from ..errors import VlmtuneError
from ..quantization import prepare_quantized
from ..run_metadata import METADATA_FILE, write_metadata
from .model import DualEncoderLoss, attach_lora, temperature_state, trainable_names
from .pairs import PairDataset, read_pairs
from .recall import pair_recall

RESULTS_FILE = "train_results.json"


def family_of(recipe):
    """The embedding family of the recipe's model, checked against model.family."""
    name = recipe.model.name_or_path
    found = registry.for_model_type(model_type_of(name), where=name)
    if recipe.model.family not in ("auto", found.name):
        raise VlmtuneError(f"model.family: {recipe.model.family!r}, but {name} is a {found.name} model (model_type "
                           f"{found.model_types[0]}); set model.family: auto or {found.name}")
    return found


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise VlmtuneError(f"output_dir {out} is a file; give a folder for the run")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise VlmtuneError(f"output_dir {out} is not empty; choose another output_dir or pass --overwrite "
                           "(train_contrastive(..., overwrite=True)) to replace it once the new run is complete")


def loss_for(recipe, family) -> str:
    """contrastive.loss, auto meaning the family's own."""
    return family.loss if recipe.contrastive.loss == "auto" else recipe.contrastive.loss


def _training_args(recipe, work: Path, has_eval: bool):
    import transformers

    t = recipe.train
    cuda = torch.cuda.is_available() and not t.use_cpu
    bf16 = cuda and torch.cuda.is_bf16_supported() and recipe.model.dtype in ("auto", "bfloat16")
    evaluating = has_eval and t.eval_steps is not None
    return transformers.TrainingArguments(
        output_dir=str(work), num_train_epochs=t.num_train_epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        weight_decay=t.weight_decay, lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_ratio,  # a fraction below 1 is a ratio in transformers 5
        max_grad_norm=t.max_grad_norm, optim=t.optim, logging_steps=t.logging_steps, seed=t.seed,
        report_to=t.report_to, use_cpu=t.use_cpu or not cuda, bf16=bf16, save_strategy="no",
        eval_strategy="steps" if evaluating else "no", eval_steps=t.eval_steps if evaluating else None,
        remove_unused_columns=False, label_names=[], disable_tqdm=False, dataloader_num_workers=recipe.data.num_workers or 0,
        # every process must hold the same number of rows when the embeddings are gathered
        dataloader_drop_last=int(os.environ.get("WORLD_SIZE", "1")) > 1, ddp_find_unused_parameters=False,
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


def build_run(r, work: Path, log=print) -> ContrastiveRun:
    """Pairs, model with LoRA, base recall on the eval pairs, and the Trainer writing under `work`."""
    import transformers

    from .trainer import ContrastiveTrainer, EpochCaptions, PairCollator

    family = family_of(r)
    loss = loss_for(r, family)
    train_pairs = read_pairs(r.data.train, r.data)
    eval_pairs = read_pairs(r.data.eval, r.data) if r.data.eval else []
    quantized = r.quantization.mode != "none"
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() and not r.train.use_cpu else "cpu"
    model, processor, _ = load_base(r.model.name_or_path, device=device if quantized else None,
                                    quantization=r.quantization if quantized else None)
    if quantized:
        prepare_quantized(model, gradient_checkpointing=False)
    transformers.set_seed(r.train.seed)  # the LoRA init, as the Trainer seeds the rest
    peft_model = attach_lora(model, family, r.lora, r.lora.towers)
    log(f"contrastive LoRA on {r.model.name_or_path} ({family.name}, loss {loss}, towers {r.lora.towers}): "
        f"{len(train_pairs)} train / {len(eval_pairs)} eval pairs, {len(trainable_names(peft_model))} trainable "
        "tensors")
    batch = r.contrastive.eval_batch_size
    before = pair_recall(peft_model.eval(), processor, eval_pairs, batch) if eval_pairs else {}
    dataset = PairDataset(train_pairs, seed=r.train.seed)
    trainer = ContrastiveTrainer(
        model=DualEncoderLoss(peft_model.train(), family, loss, r.contrastive.gather),
        args=_training_args(r, work, bool(eval_pairs)), train_dataset=dataset,
        eval_dataset=PairDataset(eval_pairs) if eval_pairs else None,  # the Trainer asks; evaluate() reads eval_pairs
        data_collator=PairCollator(processor, family), callbacks=[EpochCaptions(dataset)],
        eval_pairs=eval_pairs, processor=processor, eval_batch_size=batch,
    )  # fmt: skip
    return ContrastiveRun(r, family, loss, peft_model, processor, trainer, eval_pairs, before)


def train_contrastive(recipe, overwrite: bool = False, log=print) -> Path:
    """Train a contrastive LoRA adapter from a loaded recipe (vlmtune.load_recipe, method contrastive); returns
    the output folder."""
    return run_contrastive(recipe, overwrite, log)[0]


def run_contrastive(recipe, overwrite: bool = False, log=print) -> tuple[Path, dict]:
    """(output folder, train_results.json's metrics) of a contrastive run (the metrics on every process)."""
    out = Path(recipe.output_dir).expanduser().absolute()
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        run = build_run(recipe, work, log)
        result = run.trainer.train()
        history = run.trainer.recall_history
        if run.eval_pairs and not (history and history[-1]["step"] == result.global_step):
            run.trainer.evaluate()  # the last step, unless train.eval_steps just did
        after = {k: v for k, v in history[-1].items() if k != "step"} if history else {}
        results = {**result.metrics, "train_loss": result.training_loss, "global_step": result.global_step,
                   "loss": run.loss, "recall_before": run.recall_before, "recall": after, "recall_history": history,
                   "trainable": trainable_names(run.peft_model)}
        if after:
            log(f"recall@1 image->text {run.recall_before.get('i2t_r@1', 0):.3f} -> {after['i2t_r@1']:.3f}, "
                f"text->image {run.recall_before.get('t2i_r@1', 0):.3f} -> {after['t2i_r@1']:.3f}")
        if run.trainer.is_world_process_zero():
            _write_outputs(work, out, run, results)
            log(f"wrote {out}")
        run.trainer.accelerator.wait_for_everyone()  # every process returns once the folder is in place
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out, results


def _write_outputs(work: Path, out: Path, run: ContrastiveRun, results: dict) -> None:
    """Everything into `work`, vlmtune.json last, then `work` renamed to `out` (the earlier run removed last)."""
    import yaml
    from safetensors.torch import save_file

    from .. import curves
    from ..disk import swap_in

    r, family, peft_model = run.recipe, run.family, run.peft_model
    for leftover in list(work.iterdir()):  # the Trainer's own files (logs stay)
        if leftover.name != "logs":
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    peft_model.save_pretrained(work)
    save_file(temperature_state(peft_model, family), work / TEMPERATURE_FILE)
    run.processor.save_pretrained(work)
    (work / "recipe.yaml").write_text(yaml.safe_dump(r.to_dict(), sort_keys=False), encoding="utf-8")
    (work / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    curves.write(run.trainer.state.log_history, work, title=out.name)
    meta = {"method": "contrastive", "family": family.name, "base_model": r.model.name_or_path,
            "base_path": tiny.resolve(r.model.name_or_path), "loss": results["loss"], "towers": r.lora.towers,
            "lora": {"r": r.lora.r, "alpha": r.lora.alpha}, "quantization": r.quantization.mode,
            "recall_before": results["recall_before"],
            "recall": results["recall"], "files": sorted([*(p.name for p in work.iterdir()), METADATA_FILE])}
    write_metadata(work, meta)
    swap_in(work, out, out.parent / f".{out.name}.replaced")
