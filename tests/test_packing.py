"""Padding-free packing: bins, and packed vs unpacked equality (loss, LoRA gradients, logits, positions) on the
tiny model of every family that packs; a family that does not is refused with its reason."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.conftest import FAMILIES
from vlmtune import families
from vlmtune.data.collator import collator_for
from vlmtune.data.conversation import Conversation, Part, Turn
from vlmtune.data.dataset import to_dataset
from vlmtune.data.formatting import IGNORE_INDEX, Formatter
from vlmtune.data.packing import pack_bins, packed_dataset, packing_collator_for, padding_fraction
from vlmtune.data.prepare import Example

PACKING = [f for f in FAMILIES if families.get(f).packs]
REFUSED = [f for f in FAMILIES if not families.get(f).packs]


# ---------------------------------------------------------------- bins
def test_bins_are_first_fit_decreasing_within_capacity_and_deterministic_per_seed():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(300)] + [130]  # one longer than the capacity
    bins = pack_bins(lengths, 100, seed=3)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every example once, never split
    assert [130] in [[lengths[i] for i in b] for b in bins]  # alone in its own bin
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins if 130 not in [lengths[i] for i in b])
    assert pack_bins(lengths, 100, seed=3) == bins
    assert pack_bins(lengths, 100, seed=4) != bins  # ties ordered by the seed
    # first-fit-decreasing: close to the lower bound on the number of bins
    assert len(bins) <= sum(lengths) / 100 * 1.05 + 2


def test_bins_fill_exactly_when_lengths_allow():
    assert sorted(map(sorted, pack_bins([6, 4, 5, 5, 3, 7], 10, seed=0))) == [[0, 1], [2, 3], [4, 5]]


def test_padding_fraction_of_batches():
    assert padding_fraction([4, 2], [[0, 1]]) == pytest.approx(0.25)
    assert padding_fraction([4, 2], [[0], [1]]) == 0.0


# ---------------------------------------------------------------- packed vs unpacked, every family that packs
def _examples(family, processor, images) -> list[Example]:
    """Three examples of different lengths (two with images, one text-only); each first token labelled, which a
    pack must not let the previous example predict."""
    fmt = Formatter(family, processor)
    out = []
    for i, paths in enumerate(([images["red"]], [], [images["wide"]])):
        sizes = [tuple(reversed(Image.open(p).size)) for p in paths]
        plans = family.plan_images(processor, sizes) if paths else []
        turns = [Turn("user", [Part("image", image=str(p)) for p in paths] + [Part("text", text="q " * (3 + 4 * i))]),
                 Turn("assistant", [Part("text", text="an answer " * (i + 1))])]
        made = fmt(Conversation(turns, source=f"t:{i}"), [p.text for p in plans])
        labels = list(made.labels)
        labels[0] = made.input_ids[0]
        out.append(Example(made.input_ids, labels, [str(p) for p in paths], [p.grid for p in plans], f"t:{i}"))
    return out


def _batches(name, processor_for, images):
    family, processor = families.get(name), processor_for(name)
    examples = _examples(family, processor, images)
    ds = to_dataset(examples, family, processor)
    pad = processor.tokenizer.pad_token_id
    if pad is None:
        pad = processor.tokenizer.eos_token_id
    rows = [ds[i] for i in range(len(ds))]
    unpacked = collator_for(family, pad)(rows)
    packed_ds = packed_dataset(ds, [list(range(len(ds)))])
    packed = packing_collator_for(family, pad)([packed_ds[0]])
    return family, examples, unpacked, packed


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("name", PACKING)
def test_packed_loss_and_lora_gradients_equal_unpacked(name, lora_model, processor_for, images):
    _, _, unpacked, packed = _batches(name, processor_for, images)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    model = lora_model(name)
    loss_u, grads_u = _loss_and_grads(model, unpacked)
    loss_p, grads_p = _loss_and_grads(model, packed)
    assert torch.isfinite(loss_u)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=0)
    assert grads_u and grads_u.keys() == grads_p.keys()
    for key, g in grads_u.items():
        assert g.abs().sum() > 0, key
        rel = (grads_p[key] - g).norm() / g.norm()
        assert rel < 1e-5, f"{key}: relative gradient difference {rel:.2e}"


@pytest.mark.parametrize("name", PACKING)
def test_no_attention_across_packed_examples(name, lora_model, processor_for, images):
    """Each packed example's logits equal its own unpacked logits, and perturbing the first example's text
    tokens leaves the other examples' logits unchanged."""
    family, examples, unpacked, packed = _batches(name, processor_for, images)
    model = lora_model(name)
    lengths = [len(e.input_ids) for e in examples]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    with torch.no_grad():
        alone = model(**unpacked).logits
        together = model(**packed).logits[0]
        for i, (s, n) in enumerate(zip(starts, lengths, strict=True)):
            torch.testing.assert_close(together[s:s + n], alone[i, :n], rtol=1e-4, atol=1e-5)
        first = torch.tensor(examples[0].input_ids)
        special = set(family_special_ids(processor_for(name)))
        text = [j for j, t in enumerate(first.tolist()) if t not in special]
        perturbed = dict(packed, input_ids=packed["input_ids"].clone())
        perturbed["input_ids"][0, text] = (first[text] + 1) % 50 + 10
        changed = model(**perturbed).logits[0]
    assert not torch.allclose(changed[:lengths[0]], together[:lengths[0]])  # the perturbation did something
    torch.testing.assert_close(changed[lengths[0]:], together[lengths[0]:], rtol=0, atol=0)


def family_special_ids(processor) -> list[int]:
    tok = processor.tokenizer
    return list(tok.all_special_ids) + [i for i, t in tok.added_tokens_decoder.items() if t.special]


@pytest.mark.parametrize("name", PACKING)
def test_packed_positions_equal_each_examples_unpacked_positions(name, processor_for, images):
    family, examples, unpacked, packed = _batches(name, processor_for, images)
    pos = packed["position_ids"]
    s = 0
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        if family.position_ids is not None:
            assert pos.shape[0] == unpacked["position_ids"].shape[0] + 1  # text row + the family's rows
            assert pos[0, 0, s:s + n].tolist() == list(range(n))
            assert torch.equal(pos[1:, 0, s:s + n], unpacked["position_ids"][:, i, :n])
        else:
            assert pos[0, s:s + n].tolist() == list(range(n))  # the model's own unpacked positions
        assert packed["labels"][0, s].item() == IGNORE_INDEX  # nothing across the boundary is supervised
        torch.testing.assert_close(packed["labels"][0, s + 1:s + n], unpacked["labels"][i, 1:n])
        s += n


def test_batch_of_bins_pads_with_a_block_of_its_own(processor_for, images):
    """Two bins of different lengths: the shorter is filled with unsupervised padding positioned from 0, so
    the padding is a sequence apart and the supervised-token count (what gradient accumulation weighs by) is
    the unpacked one."""
    name = PACKING[0]
    family, examples, unpacked, _ = _batches(name, processor_for, images)
    processor = processor_for(name)
    ds = to_dataset(examples, family, processor)
    collate = packing_collator_for(family, processor.tokenizer.pad_token_id or 0, pad_to_multiple_of=8)
    batch = collate([packed_dataset(ds, [[0, 1], [2]])[i] for i in range(2)])
    n2 = len(examples[2].input_ids)
    assert batch["input_ids"].shape[1] % 8 == 0
    pos = batch["position_ids"] if batch["position_ids"].dim() == 2 else batch["position_ids"][0]
    assert pos[1, n2:].tolist() == list(range(batch["input_ids"].shape[1] - n2))
    assert (batch["labels"][1, n2:] == IGNORE_INDEX).all()
    assert (batch["labels"][:, 1:] != IGNORE_INDEX).sum() == (unpacked["labels"][:, 1:] != IGNORE_INDEX).sum()


# ---------------------------------------------------------------- refusal
@pytest.mark.parametrize("name", REFUSED)
def test_a_family_that_cannot_pack_is_refused_with_its_reason(name):
    from vlmtune.config.schema import Recipe
    from vlmtune.modeling import check_runtime

    family = families.get(name)
    recipe = Recipe()
    recipe.train.packing = True
    errs = [e for e in check_runtime(recipe, family) if e.path == "train.packing"]
    assert errs and family.packing_refused in errs[0].message
    recipe.train.packing = False
    assert not [e for e in check_runtime(recipe, family) if e.path == "train.packing"]


def test_every_family_states_whether_it_packs():
    for f in families.all_families():
        assert f.packs == (not f.packing_refused), f.name


# ---------------------------------------------------------------- through the trainer
def test_trainer_packs_and_weighs_tokens_as_the_unpacked_run(tmp_path):
    """`train.packing: true`: the trainer's rows are bins within data.max_length; its loss (TRL's own
    compute_loss) and the token count gradient accumulation divides by equal the same examples unpacked; a run
    trains to the end with accumulation."""
    import vlmtune
    from vlmtune.training import build_trainer

    from .test_training import SHAPES, recipe_for

    recipe = recipe_for("qwen2_vl", SHAPES / "train.jsonl", tmp_path, **{
        "train.packing": True, "data.max_length": 400, "train.per_device_train_batch_size": 2,
        "train.gradient_accumulation_steps": 2, "train.max_steps": 2, "train.gradient_checkpointing": False})
    plan = vlmtune.plan(recipe)
    trainer, _ = build_trainer(plan, tmp_path / "ckpt", log=lambda *_: None)
    packed_ds = trainer.train_dataset
    lengths = [len(e.input_ids) for e in plan.train.examples]
    assert len(packed_ds) < len(lengths)
    assert sorted(i for b in packed_ds.bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 400 for b in packed_ds.bins)
    collate = trainer.data_collator
    packed = collate([packed_ds[0], packed_ds[1]])
    unpacked = collate([packed_ds.rows[i] for i in packed_ds.bins[0] + packed_ds.bins[1]])
    assert "attention_mask" in unpacked and "attention_mask" not in packed  # eval-style rows stay unpacked
    model = trainer.model.eval()
    device = next(model.parameters()).device
    counts = [trainer._get_num_items_in_batch([b], device) for b in (packed, unpacked)]
    assert int(counts[0]) == int(counts[1]) > 0
    with torch.no_grad():
        losses = [trainer.compute_loss(model, {k: v for k, v in b.items()}, num_items_in_batch=counts[0])
                  for b in (packed, unpacked)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    model.train()
    trainer.train()
    assert trainer.state.global_step == 2


def test_under_flash_attention_a_batch_of_bins_is_one_row(processor_for, images):
    """transformers runs flash-attention varlen only for a batch of one row: every bin of the batch goes into it,
    each example still positioned from 0."""
    name = PACKING[0]
    family, examples, _, _ = _batches(name, processor_for, images)
    processor = processor_for(name)
    ds = to_dataset(examples, family, processor)
    items = [packed_dataset(ds, [[0, 1], [2]])[i] for i in range(2)]
    batch = packing_collator_for(family, 0, attention="flash_attention_2")(items)
    lengths = [len(e.input_ids) for e in examples]
    assert batch["input_ids"].shape == (1, sum(lengths))
    pos = batch["position_ids"] if batch["position_ids"].dim() == 2 else batch["position_ids"][0]
    assert pos[0].tolist() == [j for n in lengths for j in range(n)]
    assert packing_collator_for(family, 0)(items)["input_ids"].shape[0] == 2
