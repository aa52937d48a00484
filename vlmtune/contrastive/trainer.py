"""A transformers Trainer for contrastive LoRA: TRL has no contrastive trainer, so the plain Trainer with the
DualEncoderLoss module (whose forward returns the loss), an `evaluate` that reports recall@k on the eval pairs,
and vlmtune's atomic checkpoints holding what the run trains (weights.py), so that a run resumes and keeps its best
checkpoint (train.best_metric on a logged recall) as SFT does."""

from __future__ import annotations

import re
from pathlib import Path

import transformers

from ..checkpoints import AtomicCheckpoints
from ..embedding import image_inputs, text_inputs
from .recall import pair_recall
from .weights import load_trained, save_trained, trained_state

_RECALL = re.compile(r"^eval_((?:i2t|t2i)_r@\d+)$")  # the keys evaluate() logs


class PairCollator:
    """{"image", "caption"} items -> pixel_values, input_ids (and attention_mask) as the family pads them."""

    def __init__(self, processor, family):
        self.processor, self.family = processor, family

    def __call__(self, items: list[dict]) -> dict:
        batch = image_inputs(self.processor, [it["image"] for it in items])
        return batch | text_inputs(self.processor, self.family, [it["caption"] for it in items])


class EpochCaptions(transformers.TrainerCallback):
    """Tells the train dataset which epoch starts, so it draws that epoch's caption of every image (a resumed run
    starts from the checkpoint's epoch, so it draws what the uninterrupted run would)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.epoch = int(state.epoch or 0)


class TemperatureInStep(transformers.TrainerCallback):
    """Once the engine has partitioned the weights (ZeRO-3), has it gather the temperature for the loss module."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.register_temperature()


class ContrastiveTrainer(AtomicCheckpoints, transformers.Trainer):
    def __init__(self, *args, family=None, eval_pairs=None, processor=None, eval_batch_size: int = 64, **kwargs):
        super().__init__(*args, **kwargs)
        self.family, self.eval_pairs, self.eval_processor = family, eval_pairs, processor
        self.eval_batch = eval_batch_size

    @property
    def peft_model(self):
        return self.accelerator.unwrap_model(self.model).model

    @property
    def recall_history(self) -> list[dict]:
        """{"step", i2t_r@k..., t2i_r@k...} of every evaluation, from the log history (a resumed run's includes
        the evaluations before its checkpoint)."""
        found = []
        for entry in self.state.log_history:
            recall = {m.group(1): v for k, v in entry.items() if (m := _RECALL.match(k))}
            if recall:
                found.append({"step": entry["step"], **recall})
        return found

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """recall@1/5/10 image->text and text->image on the eval pairs (every caption), logged as eval_*."""
        if not self.eval_pairs:
            return {}
        inner = self.peft_model
        was_training = inner.training
        inner.eval()
        try:
            recall = pair_recall(inner, self.eval_processor, self.eval_pairs, self.eval_batch)
        finally:
            inner.train(was_training)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in recall.items()}
        self.log(dict(metrics))  # log() adds the epoch to what it is given
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The adapter and temperature only (the Trainer would save the whole dual encoder's state dict); under
        ZeRO-3 gathered from every rank first, so every rank calls it."""
        state = trained_state(self.peft_model)
        if self.args.should_save:
            folder = Path(output_dir or self.args.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            save_trained(folder, self.peft_model, self.family, state)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_trained(self.peft_model, Path(resume_from_checkpoint))  # without DeepSpeed (it loads its own)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled:  # the engine's checkpoint of that step holds the (partitioned) weights
            return super()._load_best_model()
        load_trained(self.peft_model, Path(self.state.best_model_checkpoint))
