"""Contrastive losses over a batch of unit-norm image and text embeddings (row i of each is a matching pair).

With several processes, every process gathers all processes' embeddings with their gradients
(torch.distributed.nn's all_gather: its backward sums each slot's gradient back to the process that made it),
scores its own rows against every column, and scales by the world size; the mean over processes is then the
loss of the whole global batch, and the averaged gradients are its gradients, so in-batch negatives span
every GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def infonce(logits: torch.Tensor, first: int) -> torch.Tensor:
    """Summed cross-entropy of rows `first..first+len(logits)` whose positive is their own global index."""
    targets = torch.arange(first, first + logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, targets, reduction="sum")


def pairwise_sigmoid(logits: torch.Tensor, first: int) -> torch.Tensor:
    """Summed -log sigmoid(±logit) of every (row, column) pair: +1 on the matching pair, -1 elsewhere."""
    signs = -torch.ones_like(logits)
    rows = torch.arange(logits.shape[0], device=logits.device)
    signs[rows, rows + first] = 1.0
    return -F.logsigmoid(signs * logits).sum()


def _gathered(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(all processes' rows with gradients, index of this process's first row, world size)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0, 1
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0), dist.get_rank() * x.shape[0], dist.get_world_size()


def contrastive_loss(kind: str, images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: torch.Tensor | None = None, gather: bool = True) -> torch.Tensor:
    """`infonce`: CLIP's symmetric loss, the mean of image->text and text->image cross-entropy over the batch,
    logits exp(logit_scale) * cosine. `sigmoid`: SigLIP's loss, -log sigmoid(z * (exp(logit_scale) * cosine +
    logit_bias)) summed over the texts and averaged over the images. Every process must pass the same batch size
    when gathering (the trainer drops a last uneven batch)."""
    all_images, first, world = _gathered(images) if gather else (images, 0, 1)
    all_texts = _gathered(texts)[0] if gather else texts
    n = all_images.shape[0]
    scale = logit_scale.float().exp()
    image_logits = scale * images @ all_texts.T
    if kind == "infonce":
        text_logits = scale * texts @ all_images.T
        loss = (infonce(image_logits, first) + infonce(text_logits, first)) / (2 * n)
    elif kind == "sigmoid":
        if logit_bias is None:
            raise ValueError("the sigmoid loss needs the model's logit_bias")
        loss = pairwise_sigmoid(image_logits + logit_bias.float(), first) / n
    else:
        raise ValueError(f"unknown contrastive loss {kind!r}; supported: infonce, sigmoid")
    return loss * world
