"""The trained dual encoder: LoRA on the chosen towers' attention and MLP layers, their projections and the
temperature (logit_scale, logit_bias) trainable, and a module whose forward returns the contrastive loss."""

from __future__ import annotations

import torch

from ..embedding import image_features, text_features
from ..embedding.registry import EmbeddingFamily
from .losses import contrastive_loss


def attach_lora(model, family: EmbeddingFamily, lora, towers: str):
    """A PeftModel: LoRA where lora.target_modules says (default: the towers' encoder layers), the towers'
    projections as full trained copies (modules_to_save), the temperature parameters trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_rslora=lora.use_rslora,
        target_modules=lora.target_modules or family.lora_target_regex(towers),
        modules_to_save=[*family.trained_projections(towers), *lora.modules_to_save],
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    for name in family.temperature:
        getattr(peft_model.get_base_model(), name).requires_grad_(True)
    return peft_model


def trainable_names(peft_model) -> list[str]:
    return [n for n, p in peft_model.named_parameters() if p.requires_grad]


def temperature_state(peft_model, family: EmbeddingFamily) -> dict[str, torch.Tensor]:
    base = peft_model.get_base_model()
    return {name: getattr(base, name).detach().cpu().clone() for name in family.temperature}


class DualEncoderLoss(torch.nn.Module):
    """forward(pixel_values, input_ids, attention_mask) -> {"loss", "image_embeds", "text_embeds"}: one module for
    the Trainer (and DDP, whose gradient hooks need the forward to run through it)."""

    def __init__(self, peft_model, family: EmbeddingFamily, loss: str, gather: bool = True):
        super().__init__()
        self.model, self.family, self.loss, self.gather = peft_model, family, loss, gather

    def forward(self, pixel_values, input_ids, attention_mask=None):
        images = image_features(self.model, pixel_values)
        texts = text_features(self.model, input_ids, attention_mask)
        base = self.model.get_base_model()
        bias = getattr(base, "logit_bias", None)
        loss = contrastive_loss(self.loss, images, texts, base.logit_scale, bias, gather=self.gather)
        return {"loss": loss, "image_embeds": images, "text_embeds": texts}
