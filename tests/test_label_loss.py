"""Loss only on labelled positions: same loss and LoRA gradients as the full logits, bounded logits memory."""

from __future__ import annotations

import pytest
import torch

from vlmtune import families
from vlmtune.data.collator import collator_for
from vlmtune.data.dataset import to_dataset
from vlmtune.label_loss import IGNORE_INDEX, supervised_loss

from .conftest import FAMILIES
from .test_families import _examples


def _lora_model(family, model_dir):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = family.load_class().from_pretrained(model_dir(family.name), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(family.default_lora_targets),
                        init_lora_weights=False)  # non-zero B: every LoRA weight gets a gradient
    model = get_peft_model(model, config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model.train()


def _full_loss(model, batch, num_items=None):
    """The reference: full logits, shifted, token-weighted as TRL's SFTTrainer weights them."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels,
                                            ignore_index=IGNORE_INDEX, reduction="sum")
    return nll / (num_items if num_items is not None else (labels != IGNORE_INDEX).sum())


def _lora_grads(model, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), _grads(model)


def _grads(model) -> dict[str, torch.Tensor]:
    """LoRA gradients (a vision layer whose output the model never reads has none)."""
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert any("language" in n or "text" in n for n in grads) or len(grads) > 4
    return grads


def _batches(name, processor_for, images):
    family, processor = families.get(name), processor_for(name)
    rows = list(to_dataset(_examples(family, processor, images), family, processor))
    collate = collator_for(family, processor.tokenizer.pad_token_id)
    return family, collate(rows[:2]), collate(rows[2:])


def _assert_close(a: dict, b: dict, rel: float):
    """Relative error of each gradient tensor (by norm). fp32 round-off from the chunked summation order reaches
    ~2e-5 in LoRA weights deep in a vision tower; a wrong shift, mask or weighting is off by O(1)."""
    assert a.keys() == b.keys()
    for n in a:
        assert b[n].norm() > 0, n
        assert (a[n] - b[n]).norm() <= rel * b[n].norm(), n


@pytest.mark.parametrize("family_name", FAMILIES)
def test_supervised_loss_and_lora_gradients_equal_the_full_logits(family_name, model_dir, processor_for, images):
    family, first, second = _batches(family_name, processor_for, images)
    model = _lora_model(family, model_dir)
    full, full_grads = _lora_grads(model, lambda: _full_loss(model, first))
    ours, our_grads = _lora_grads(model, lambda: supervised_loss(model, first, chunk=7)[0])
    assert ours.item() == pytest.approx(full.item(), rel=1e-6)
    _assert_close(our_grads, full_grads, rel=1e-4)
    # gradient accumulation: two micro-batches with different supervised counts, each over the step's count
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in (first, second)]
    assert counts[0] != counts[1]
    step = torch.tensor(sum(counts))

    def accumulated(loss_fn):
        model.zero_grad()
        total = 0.0
        for b in (first, second):
            loss = loss_fn(b)
            loss.backward()
            total += loss.item()
        return total, _grads(model)

    full_total, full_acc = accumulated(lambda b: _full_loss(model, b, step))
    our_total, our_acc = accumulated(lambda b: supervised_loss(model, b, num_items_in_batch=step, chunk=5)[0])
    assert our_total == pytest.approx(full_total, rel=1e-6)
    _assert_close(our_acc, full_acc, rel=1e-4)


def test_no_logits_larger_than_one_chunk_are_built(model_dir, processor_for, images):
    name = FAMILIES[0]
    family, batch, _ = _batches(name, processor_for, images)
    model = _lora_model(family, model_dir)
    head = model.get_output_embeddings()
    shapes: list[tuple] = []
    hook = head.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    chunk = 3
    loss, stats, _ = supervised_loss(model, batch, chunk=chunk)
    loss.backward()  # backward recomputes each chunk: still no more than chunk rows
    hook.remove()
    vocab = head.weight.shape[0]
    sizes = [s[0] * (s[1] if len(s) == 3 else 1) for s in shapes]
    assert max(sizes) <= chunk and all(s[-1] == vocab for s in shapes)
    assert sum(sizes) == 2 * int(stats["count"])  # forward and the backward's recompute, labelled rows only
    assert batch["input_ids"].numel() > int(stats["count"])  # unlabelled positions were never projected


def test_a_batch_without_labels_gives_a_zero_loss_with_a_gradient(model_dir, processor_for, images):
    family, batch, _ = _batches(FAMILIES[0], processor_for, images)
    model = _lora_model(family, model_dir)
    batch = dict(batch, labels=torch.full_like(batch["labels"], IGNORE_INDEX))
    loss, stats, _ = supervised_loss(model, batch)
    loss.backward()
    assert loss.item() == 0.0 and int(stats["count"]) == 0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters() if p.requires_grad)


def test_the_trainer_switch_gives_the_sft_trainers_loss_from_labelled_rows_only(tmp_path):
    from vlmtune.preflight import plan_run
    from vlmtune.training import build_trainer

    from .test_training import SHAPES, recipe_for

    recipe = recipe_for(FAMILIES[0], SHAPES / "train.jsonl", tmp_path, **{"train.max_steps": 1})
    assert recipe.train.loss_on_labels_only  # on by default: proven equal for every family above
    trainer, _ = build_trainer(plan_run(recipe), tmp_path / "ckpt", log=lambda *a: None)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    head = trainer.model.get_output_embeddings()
    rows: list[int] = []
    hook = head.register_forward_hook(lambda m, a, out: rows.append(out.shape[:-1].numel()))
    count = torch.tensor(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) + 3)  # as if accumulating
    losses = {}
    for on in (True, False):
        trainer.loss_on_labels_only = on
        losses[on] = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=count).item()
        if on:
            assert sum(rows) == count.item() - 3  # the head saw the labelled positions and nothing else
    rows.clear()
    trainer.loss_on_labels_only = True
    head.weight.ds_id = 0  # as ZeRO-3 marks a partitioned weight: the SFTTrainer's own chunked head instead
    try:
        zero3 = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=count).item()
    finally:
        del head.weight.ds_id
    hook.remove()
    assert not rows and zero3 == pytest.approx(losses[False], rel=1e-6)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert trainer._metrics["train"]["mean_token_accuracy"]


def test_a_ddp_wrapped_model_gives_the_same_loss(model_dir, processor_for, images, tmp_path):
    """Plain DDP (torchrun without DeepSpeed) hands the trainer a DistributedDataParallel wrapper."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    family, batch, _ = _batches(FAMILIES[0], processor_for, images)
    model = _lora_model(family, model_dir)
    plain = supervised_loss(model, batch)[0].item()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        assert not hasattr(wrapped, "get_output_embeddings")
        assert supervised_loss(wrapped, batch)[0].item() == pytest.approx(plain, rel=1e-6)
    finally:
        dist.destroy_process_group()
