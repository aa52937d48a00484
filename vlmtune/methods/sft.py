"""Supervised fine-tuning: TRL's SFTTrainer on vlmtune's formatted examples, the loss on the labelled reply tokens
only (label_loss.py), packing and the vision-feature cache available."""

from __future__ import annotations

from ..data.preference import is_pair_format
from ..errors import FieldError
from .base import Method


class SFT(Method):
    name = "sft"

    def validate(self, recipe, check_paths=True) -> list[FieldError]:
        if recipe.method == self.name and is_pair_format(recipe.data.format):
            return [FieldError("data.format", f"{recipe.data.format} holds preference pairs: set method: dpo "
                               "(or `vlmtune dpo`), or give SFT rows")]
        return []

    def datasets(self, plan, vision, log=print):
        from ..data.dataset import to_dataset
        from ..data.packing import pack_dataset

        # mark_bad: a sample whose media fail to load mid-run is skipped and counted by the trainer's guards
        train = to_dataset(plan.train.examples, plan.family, plan.processor, plan.model_config, mark_bad=True,
                           **vision.dataset_args("train"))
        lengths = [len(e.input_ids) for e in plan.train.examples]
        t = plan.recipe.train
        if t.packing:  # a batch is then per_device_train_batch_size packed rows; eval batches stay unpacked
            train = pack_dataset(train, lengths, plan.recipe.data.max_length, t.seed, log)
            lengths = [sum(lengths[i] for i in b) for b in train.bins]
        evaluation = (to_dataset(plan.eval.examples, plan.family, plan.processor, plan.model_config, mark_bad=True,
                                 **vision.dataset_args("eval")) if plan.eval else None)
        return train, evaluation, lengths

    def collator(self, plan, pad_token_id, pad_to_multiple_of, attention):
        from ..data.collator import collator_for
        from ..data.packing import packing_collator_for

        collate = collator_for(plan.family, pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
        if plan.recipe.train.packing:
            collate = packing_collator_for(plan.family, pad_token_id, pad_to_multiple_of=pad_to_multiple_of,
                                           unpacked=collate, attention=attention)
        return collate

    def trainer_args(self, make, recipe):
        from trl import SFTConfig

        return make(SFTConfig, max_length=None, dataset_kwargs={"skip_prepare_dataset": True})

    def trainer_kwargs(self, plan, lengths):
        return {"loss_on_labels_only": plan.recipe.train.loss_on_labels_only}

    def trainer_bases(self):
        from trl import SFTTrainer

        from ..label_loss import LabelOnlyLoss

        return LabelOnlyLoss, SFTTrainer
