"""A transformers Trainer for contrastive LoRA: TRL has no contrastive trainer, so the plain Trainer with the
DualEncoderLoss module (whose forward returns the loss) and an `evaluate` that reports recall@k on the eval pairs."""

from __future__ import annotations

import transformers

from ..embedding import image_inputs, text_inputs
from .recall import pair_recall


class PairCollator:
    """{"image", "caption"} items -> pixel_values, input_ids (and attention_mask) as the family pads them."""

    def __init__(self, processor, family):
        self.processor, self.family = processor, family

    def __call__(self, items: list[dict]) -> dict:
        batch = image_inputs(self.processor, [it["image"] for it in items])
        return batch | text_inputs(self.processor, self.family, [it["caption"] for it in items])


class EpochCaptions(transformers.TrainerCallback):
    """Tells the train dataset which epoch starts, so it draws that epoch's caption of every image."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.epoch = int(state.epoch or 0)


class ContrastiveTrainer(transformers.Trainer):
    def __init__(self, *args, eval_pairs=None, processor=None, eval_batch_size: int = 64, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_pairs, self.eval_processor, self.eval_batch = eval_pairs, processor, eval_batch_size
        self.recall_history: list[dict] = []

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """recall@1/5/10 image->text and text->image on the eval pairs (every caption), logged as eval_*."""
        if not self.eval_pairs:
            return {}
        inner = self.accelerator.unwrap_model(self.model).model
        was_training = inner.training
        inner.eval()
        try:
            recall = pair_recall(inner, self.eval_processor, self.eval_pairs, self.eval_batch)
        finally:
            inner.train(was_training)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in recall.items()}
        self.recall_history.append({"step": self.state.global_step, **recall})
        self.log(dict(metrics))  # log() adds the epoch to what it is given
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
