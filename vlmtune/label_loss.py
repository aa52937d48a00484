"""Loss only where there are labels: the LM head and cross-entropy run on the supervised positions alone.

The model runs its own forward (every family's input plumbing unchanged) with a pre-hook on its output
embeddings that keeps the last hidden states and hands the head an empty slice, so no full logits are built.
The positions whose next token carries a label (position t predicts label t+1) are gathered and projected in
chunks of `chunk` tokens; each chunk is recomputed in backward (activation checkpointing), so at most
chunk x vocab logits (and their gradient) exist at once. The loss is the token-weighted mean TRL's SFTTrainer
uses: the sum over supervised tokens over `num_items_in_batch` (the step's count under gradient accumulation),
else over this batch's count.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .errors import VlmtuneError

IGNORE_INDEX = -100
CHUNK_TOKENS = 1024  # tokens per head projection: 1024 x 151k fp32 logits are ~0.6 GB with their gradient


def _chunk_nll(head, hidden: torch.Tensor, targets: torch.Tensor):
    """Summed NLL of one chunk (differentiable), with the correct top-1 count and entropy sum (detached)."""
    logits = head(hidden).float()
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    with torch.no_grad():
        correct = (logits.argmax(-1) == targets).sum()
        logp = torch.log_softmax(logits, -1)
        entropy = -(logp.exp() * logp).sum()
    return nll, correct, entropy


def supervised_loss(model, inputs: dict, num_items_in_batch=None, chunk: int = CHUNK_TOKENS):
    """(loss, stats, outputs) for a batch with `labels`; stats: supervised count, top-1 correct, entropy sum.

    `model` may be PEFT-wrapped; `outputs` is the model's own output (its logits empty), for e.g. an aux loss."""
    labels = inputs["labels"]
    head = unwrapped(model).get_output_embeddings()
    kept: list[torch.Tensor] = []

    def keep_hidden(_module, args):
        kept.append(args[0])
        return (args[0][..., :0, :],)

    handle = head.register_forward_pre_hook(keep_hidden)
    try:
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
    finally:
        handle.remove()
    if len(kept) != 1:
        raise VlmtuneError(f"train.loss_on_labels_only: the model called its output embeddings {len(kept)} times "
                           "in one forward (expected once); set train.loss_on_labels_only: false for this model")
    hidden = kept[0]
    shifted = labels[:, 1:].to(hidden.device)
    mask = shifted != IGNORE_INDEX
    picked, targets = hidden[:, :-1][mask], shifted[mask]
    total = hidden.sum() * 0.0  # keeps a batch without labels connected to the graph (a zero gradient)
    correct = torch.zeros((), device=hidden.device, dtype=torch.long)
    entropy = torch.zeros((), device=hidden.device)
    for start in range(0, targets.numel(), chunk):
        nll, c, e = checkpoint(_chunk_nll, head, picked[start:start + chunk], targets[start:start + chunk],
                               use_reentrant=False)
        total, correct, entropy = total + nll, correct + c, entropy + e
    count = mask.sum()
    denominator = count.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = total / torch.as_tensor(denominator, device=total.device)
    return loss, {"count": count, "correct": correct, "entropy": entropy}, outputs


def unwrapped(model):
    """The model under a DistributedDataParallel-style wrapper (`.module`), which has no get_output_embeddings;
    the forward still runs through the wrapper, which synchronises the gradients."""
    while not hasattr(model, "get_output_embeddings") and hasattr(model, "module"):
        model = model.module
    return model


def _partitioned(module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions this module's weight (it is gathered only inside its forward)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


class LabelOnlyLoss:
    """SFTTrainer mixin (before SFTTrainer): `train.loss_on_labels_only` computes the loss with supervised_loss.

    Falls back to the trainer's own loss where that needs the full logits (a custom loss function, label
    smoothing, outputs asked for), and under ZeRO-3 (a partitioned head is gathered per call, so a chunk's
    recompute in backward would not see the weight it saw forward; TRL's own head is chunked too). Logs mean_token_accuracy, entropy and num_tokens as the SFTTrainer does."""

    def __init__(self, *args, loss_on_labels_only: bool = False, **kwargs):
        self.loss_on_labels_only = loss_on_labels_only
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if (not self.loss_on_labels_only or return_outputs or self.compute_loss_func is not None
                or self.label_smoother is not None or getattr(self.args, "loss_type", "nll") != "nll"
                or _partitioned(unwrapped(model).get_output_embeddings())):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        loss, stats, outputs = supervised_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # DDP averages the gradients
        if self.aux_loss_enabled and getattr(outputs, "aux_loss", None) is not None:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
        self._log_label_metrics(inputs, stats)
        return loss

    def _log_label_metrics(self, inputs: dict, stats: dict) -> None:
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        count = gather(stats["count"]).sum()
        correct, entropy = gather(stats["correct"]).sum(), gather(stats["entropy"]).sum()
        valid = count.item() > 0
        self._metrics[mode]["entropy"].append((entropy / count).item() if valid else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / count).item() if valid else 0.0)
        if mode == "train":  # packed rows carry no attention mask: every token is real
            mask = inputs.get("attention_mask")
            local = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel(),
                                                                      device=inputs["input_ids"].device)
            self._total_train_tokens += gather(local).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
