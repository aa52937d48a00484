"""Batching: padding, labels, positions, and vision tensors from images of different sizes."""

from __future__ import annotations

from PIL import Image

from vlmtune import families
from vlmtune.data.collator import collator_for
from vlmtune.data.conversation import Conversation, Part, Turn
from vlmtune.data.dataset import to_dataset
from vlmtune.data.formatting import IGNORE_INDEX, Formatter
from vlmtune.data.prepare import Example


def test_collator_shapes_with_images_of_different_sizes(processor_for, images):
    family, processor = families.get("qwen2_vl"), processor_for("qwen2_vl")
    fmt = Formatter(family, processor)
    rows = [[images["red"]], [images["wide"], images["tall"]], [], [images["big"]]]
    examples = []
    for i, paths in enumerate(rows):
        plans = family.plan_images(processor, [tuple(reversed(Image.open(p).size)) for p in paths]) if paths else []
        turns = [Turn("user", [Part("image", image=str(p)) for p in paths] + [Part("text", text="q" * (i + 1))]),
                 Turn("assistant", [Part("text", text="answer")])]
        out = fmt(Conversation(turns, source=f"t:{i}"), [p.text for p in plans])
        examples.append(Example(out.input_ids, out.labels, [str(p) for p in paths], [p.grid for p in plans], f"t:{i}"))
    ds = to_dataset(examples, family, processor)
    batch = collator_for(family, processor.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    lengths = [len(e.input_ids) for e in examples]
    n, L = len(examples), max(lengths)
    assert batch["input_ids"].shape == (n, L) and batch["labels"].shape == (n, L)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["position_ids"].shape == (3, n, L)
    grids = [g for e in examples for g in e.grids]
    assert batch["image_grid_thw"].tolist() == [list(g) for g in grids]
    assert batch["pixel_values"].shape[0] == sum(t * h * w for t, h, w in grids)
    for i, k in enumerate(lengths):
        assert (batch["labels"][i, k:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][i, k:] == processor.tokenizer.pad_token_id).all()
    image_id = processor.tokenizer.convert_tokens_to_ids(family.image_placeholder)
    expected = [sum(t * h * w // 4 for t, h, w in e.grids) for e in examples]
    assert (batch["input_ids"] == image_id).sum(1).tolist() == expected


def test_text_only_batch_has_no_vision_tensors(processor_for):
    family, processor = families.get("qwen2_vl"), processor_for("qwen2_vl")
    out = Formatter(family, processor)(Conversation([Turn("user", [Part("text", text="hi")]),
                                                     Turn("assistant", [Part("text", text="yo")])], source="t:1"), [])
    ds = to_dataset([Example(out.input_ids, out.labels, [], [], "t:1")], family, processor)
    batch = collator_for(family, 0, pad_to_multiple_of=8)([ds[0]])
    assert "pixel_values" not in batch and batch["input_ids"].shape[1] % 8 == 0


def test_an_image_that_fails_to_decode_during_training_names_its_row(processor_for, tmp_path):
    import pytest

    from vlmtune.errors import VlmtuneError

    family, processor = families.get("qwen2_vl"), processor_for("qwen2_vl")
    good = tmp_path / "img.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(good)
    data = good.read_bytes()
    broken = tmp_path / "cut.png"
    broken.write_bytes(data[: len(data) // 2])  # the header reads; the pixels do not
    (plan,) = family.plan_images(processor, [(64, 64)])
    turns = [Turn("user", [Part("image", image=str(broken)), Part("text", text="q")]),
             Turn("assistant", [Part("text", text="a")])]
    out = Formatter(family, processor)(Conversation(turns, source="train.jsonl:7"), [plan.text])
    ds = to_dataset([Example(out.input_ids, out.labels, [str(broken)], [plan.grid], "train.jsonl:7")], family,
                    processor)
    with pytest.raises(VlmtuneError, match="train.jsonl:7: "):
        ds[0]
