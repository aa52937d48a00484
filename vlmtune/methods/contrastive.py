"""Contrastive LoRA of a dual encoder (CLIP / SigLIP, vlmtune/embedding): image-caption pairs, the family's
contrastive loss over in-batch negatives. Its model is no VLM, so it brings its own run (vlmtune/contrastive/, entry.py)
instead of the shared one; its recipe is the shared recipe with `method: contrastive`, the `contrastive:`
section and `lora.towers`."""

from __future__ import annotations

from dataclasses import dataclass

from ..embedding import registry
from ..errors import FieldError
from .base import Method

FORMAT = "caption"


@dataclass
class ContrastiveConfig:
    """The recipe's `contrastive:` section."""

    loss: str = "auto"  # auto (the family's: clip infonce, siglip sigmoid) | infonce | sigmoid
    gather: bool = True  # in-batch negatives from every process (embeddings gathered with their gradients)
    eval_batch_size: int = 64  # images (texts) embedded at a time for recall@k


class Contrastive(Method):
    name = "contrastive"
    section = ContrastiveConfig
    uses_vision_cache = False
    own_run = "vlmtune.contrastive.entry"  # its run, check and evaluate (the run layer imports it)
    # accumulated batches add no negatives (each batch is its own contrastive problem): one batch per step unless
    # the recipe asks for more
    defaults = {"train.gradient_accumulation_steps": 1}

    def model_families(self):
        return registry.names()

    def validate(self, recipe, check_paths=True) -> list[FieldError]:
        if recipe.method != self.name:
            if recipe.lora.towers != "both":
                return [FieldError("lora.towers", f"applies to method contrastive (dual encoders) only; remove it "
                                   f"for method {recipe.method}")]
            return []
        errs, t = [], recipe.train

        def refuse(cond: bool, path: str, message: str) -> None:
            if cond:
                errs.append(FieldError(path, message))

        refuse(recipe.data.format != FORMAT, "data.format", "must be caption for method contrastive (image-caption "
               f"rows; data.columns maps image and caption to your columns), got {recipe.data.format!r}")
        refuse(recipe.quantization.mode == "8bit", "quantization.mode", "8bit is not supported for method "
               "contrastive; use 4bit (QLoRA) or none")
        refuse(t.packing, "train.packing", "does not apply to method contrastive (no token sequences); remove it")
        refuse(bool(t.eval_metrics), "train.eval_metrics", "does not apply to method contrastive (its evaluation "
               "logs recall@1/5/10 on data.eval); leave it empty")
        refuse(recipe.distributed.deepspeed != "none" and recipe.quantization.mode != "none", "quantization.mode",
               f"{recipe.quantization.mode} with DeepSpeed is not supported for method contrastive: use "
               "quantization.mode none with distributed.deepspeed, or 4bit without DeepSpeed (torchrun alone "
               "gathers the negatives across processes too)")
        return errs

    def eval_keys(self, recipe) -> list[str]:
        """What its evaluation logs (train.best_metric picks one): eval_i2t_r@k and eval_t2i_r@k."""
        from ..contrastive.recall import KS

        return [f"eval_{way}_r@{k}" for k in KS for way in ("i2t", "t2i")]
