"""The trained dual encoder: LoRA on the chosen towers' attention and MLP layers, their projections and the
temperature (logit_scale, logit_bias) trainable, and a module whose forward returns the contrastive loss."""

from __future__ import annotations

import torch

from ..distributed.zero3 import is_partitioned
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


SCALAR_SHAPES = "vlmtune_scalar_shapes"  # attribute of a model whose 0-dim parameters were made 1-dim


def scalars_as_vectors(model) -> None:
    """Make every 0-dim parameter (CLIP's logit_scale) a 1-element vector, for DeepSpeed: its engine views each
    weight as bytes to broadcast (ZeRO-3: partition) it, which a 0-dim tensor cannot be. The shapes are kept to
    save the weights as they were."""
    shapes = {}
    for name, param in list(model.named_parameters()):
        if param.dim() == 0:
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            setattr(module, leaf, torch.nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
            shapes[name] = ()
    setattr(model, SCALAR_SHAPES, shapes)


def trainable_names(peft_model) -> list[str]:
    return [n for n, p in peft_model.named_parameters() if p.requires_grad]


def temperature_state(peft_model, family: EmbeddingFamily, values: dict | None = None) -> dict[str, torch.Tensor]:
    """logit_scale (and logit_bias) in the model's own shapes; `values`: the tensors to use instead of the model's
    (gathered from every ZeRO-3 rank)."""
    base = peft_model.get_base_model()
    shapes = getattr(base, SCALAR_SHAPES, {})
    state = {}
    for name in family.temperature:
        value = (values[name] if values is not None else getattr(base, name)).detach().cpu().clone()
        state[name] = value.reshape(shapes[name]) if name in shapes else value
    return state


class DualEncoderLoss(torch.nn.Module):
    """forward(pixel_values, input_ids, attention_mask) -> {"loss", "image_embeds", "text_embeds"}: one module for
    the Trainer (and DDP, whose gradient hooks need the forward to run through it)."""

    def __init__(self, peft_model, family: EmbeddingFamily, loss: str, gather: bool = True):
        super().__init__()
        self.model, self.family, self.loss, self.gather = peft_model, family, loss, gather

    def register_temperature(self) -> None:
        """Under ZeRO-3 (once the engine partitioned the weights): the temperature parameters are read in this
        module's forward, outside their own module's, so ZeRO-3 is told to gather them for it."""
        base = self.model.get_base_model()
        for name in self.family.temperature:
            param = getattr(base, name)
            if is_partitioned(param):
                import deepspeed

                deepspeed.zero.register_external_parameter(self, param)

    def forward(self, pixel_values, input_ids, attention_mask=None):
        images = image_features(self.model, pixel_values)
        texts = text_features(self.model, input_ids, attention_mask)
        base = self.model.get_base_model()
        bias = getattr(base, "logit_bias", None)
        loss = contrastive_loss(self.loss, images, texts, base.logit_scale, bias, gather=self.gather)
        return {"loss": loss, "image_embeds": images, "text_embeds": texts}
