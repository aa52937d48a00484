"""SmolVLM2 / Idefics3: real templates, tile sequences as the processor writes them, the pixel mask in the batch,
LoRA on the language model only, the reply's leading space supervised, pixel-count knobs refused."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

import vlmtune
from vlmtune import families
from vlmtune.data.collator import collator_for
from vlmtune.data.dataset import to_dataset
from vlmtune.data.formatting import IGNORE_INDEX, Formatter
from vlmtune.families.smolvlm import IDEFICS3_CHAT_TEMPLATE, SMOLVLM_CHAT_TEMPLATE, tile_grid

from .conftest import REFERENCE
from .test_families import _examples
from .test_formatting import conv, supervised_runs, texts_for
from .test_training import SHAPES

FAMILIES = ("smolvlm", "idefics3")


def load_recipe(family, **overrides):
    return vlmtune.load_recipe(None, overrides={"model.name_or_path": f"builtin:{family.tiny_name}",
                                                "data.train": str(SHAPES / "train.jsonl"), **overrides})
TEMPLATES = {"SmolVLM2.image-only.jinja": SMOLVLM_CHAT_TEMPLATE, "Idefics3-8B-Llama3.jinja": IDEFICS3_CHAT_TEMPLATE}


def reference_template(name: str) -> str:
    path = REFERENCE / "templates" / name
    if not path.is_file():
        pytest.skip("../shared/reference is not present")
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_are_the_real_ones(name):
    assert TEMPLATES[name] == reference_template(name)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_tiny_processors_use_the_real_templates(family_name, processor_for):
    template = {"smolvlm": SMOLVLM_CHAT_TEMPLATE, "idefics3": IDEFICS3_CHAT_TEMPLATE}[family_name]
    assert processor_for(family_name).chat_template == template


def test_smolvlm2_video_template_renders_image_conversations_as_the_image_template(processor_for, images):
    """transformers swaps in its DEFAULT_CHAT_TEMPLATE (the reference video template, or its later form) only for
    conversations with video, which this family refuses; for everything else they render as the image template."""
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    from vlmtune.data.formatting import template_messages

    processor = processor_for("smolvlm")
    c = conv(("user", images["red"], "What colour?"), ("assistant", "Red."), ("user", "Sure?"), ("assistant", "Yes."))
    messages = template_messages(c.turns)
    expected = processor.apply_chat_template(messages, tokenize=False)
    for video in (reference_template("SmolVLM2.default-video.jinja"), DEFAULT_CHAT_TEMPLATE):
        assert processor.apply_chat_template(messages, chat_template=video, tokenize=False) == expected


# --- tiles ---------------------------------------------------------------------------------------------------

def with_sizes(processor, longest_edge: int, split: bool = True):
    """The processor with its image processor resizing to `longest_edge` (the tile side stays the vision size)."""
    out = copy.deepcopy(processor)
    ip = out.image_processor
    out.image_processor = type(ip)(size={"longest_edge": longest_edge}, max_image_size=dict(ip.max_image_size),
                                   do_image_splitting=split)
    return out


def processor_text(processor, image) -> tuple[str, list[int]]:
    """What the processor writes in place of one `<image>`, and the ids of that text in a prompt."""
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
    ids = processor(text=[prompt], images=[[image]], return_tensors="pt")["input_ids"][0].tolist()
    before, after = prompt.split("<image>")
    text = processor.tokenizer.decode(ids)
    return text.removeprefix(before).removesuffix(after), ids


# (height, width): square, wide, tall, tiny, extreme strips, odd sizes
SIZES = [(56, 56), (40, 120), (90, 30), (10, 10), (20, 500), (500, 20), (333, 250), (33, 64), (15, 56)]


@pytest.mark.parametrize("family_name", FAMILIES)
@pytest.mark.parametrize("longest_edge, split", [(32, True), (64, True), (100, True), (192, True), (192, False)])
def test_tile_text_is_what_the_processor_writes(family_name, longest_edge, split, processor_for):
    """One tile (an image no larger than a tile, or splitting off) up to 6 x 6 tiles, including a resize edge that
    is not a multiple of the tile side (100), where transformers' own get_number_of_image_patches is off."""
    family = families.get(family_name)
    processor = with_sizes(processor_for(family_name), longest_edge, split)
    grids, off = set(), 0
    for h, w in SIZES:
        (plan,) = family.plan_images(processor, [(h, w)])
        text, ids = processor_text(processor, Image.new("RGB", (w, h)))
        assert plan.text == text, (h, w)
        prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
        assert len(ids) - len(processor.tokenizer(prompt.replace("<image>", ""))["input_ids"]) == plan.tokens
        grids.add(plan.grid)
        off += processor.image_processor.get_number_of_image_patches(h, w)[1:] != plan.grid
    if longest_edge == 32 or not split:
        assert grids == {(0, 0)}  # the global view alone
    else:
        assert (0, 0) not in grids and len(grids) > 1
    if longest_edge == 192:
        assert (6, 6) in grids or not split
    assert (off > 0) == (longest_edge == 100)


def test_tile_grid_follows_the_resize_for_the_vision_encoder(processor_for):
    """15 x 56 at longest edge 100, tile 32: resized to 26 x 100, then to 64 x 128: 2 x 4 tiles (not 1 x 4)."""
    processor = with_sizes(processor_for("smolvlm"), 100)
    assert tile_grid(processor.image_processor, 15, 56) == (2, 4)
    out = processor.image_processor(images=[[Image.new("RGB", (56, 15))]], return_row_col_info=True)
    assert (out["rows"], out["cols"]) == ([[2]], [[4]])


# --- batching ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family_name", FAMILIES)
def test_pixel_attention_mask_reaches_the_batch(family_name, processor_for, images):
    family, processor = families.get(family_name), processor_for(family_name)
    rows = [to_dataset(_examples(family, processor, images), family, processor)[i] for i in (0, 1)]
    crops = [r["pixel_values"].shape[1] for r in rows]  # wide: 1 x 2 tiles + global; big + tall: 5 + 3
    assert crops == [3, 8]
    batch = collator_for(family, processor.tokenizer.pad_token_id)(rows)
    mask = batch["pixel_attention_mask"]
    assert mask.shape == (2, 8, 32, 32) and mask.dtype == torch.long
    assert bool(mask[0, :3].all()) and not mask[0, 3:].any() and bool(mask[1].all())


# --- LoRA ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family_name", FAMILIES)
def test_lora_goes_on_the_language_model_only(family_name, model_dir):
    import re

    from vlmtune.modeling import lora_targets

    family = families.get(family_name)
    model = family.load_class().from_pretrained(model_dir(family_name))
    recipe = load_recipe(family)
    pattern = re.compile(lora_targets(model, family, recipe.lora))
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = [n for n in linear if pattern.fullmatch(n)]
    # the SigLIP-style tower has q_proj / v_proj too: the path, not the name, keeps LoRA off it
    assert any(n.startswith("model.vision_model.") and n.endswith(".q_proj") for n in linear)
    assert chosen and all(n.startswith("model.text_model.layers.") for n in chosen)
    assert {n.rsplit(".", 1)[-1] for n in chosen} == set(family.default_lora_targets)
    assert len(chosen) == 2 * len(family.default_lora_targets)  # 2 layers


# --- the reply after `Assistant:` ----------------------------------------------------------------------------

@pytest.mark.parametrize("family_name", FAMILIES)
def test_the_space_before_a_reply_is_supervised_with_it(family_name, processor_for, images):
    """The template writes `Assistant:` as the generation prompt and `Assistant: reply`; the model generates
    " reply<end_of_utterance>", so that is what is supervised, the space merged into the reply's first token."""
    family, processor = families.get(family_name), processor_for(family_name)
    tok = processor.tokenizer
    c = conv(("user", images["red"], "What colour is it?"), ("assistant", "It is red."))
    out = Formatter(family, processor)(c, texts_for(family, processor, c.images))
    assert supervised_runs(tok, out.input_ids, out.labels) == [" It is red.<end_of_utterance>"]
    supervised = [i for i, lab in zip(out.input_ids, out.labels, strict=True) if lab != IGNORE_INDEX]
    assert supervised == tok(" It is red.<end_of_utterance>", add_special_tokens=False)["input_ids"]
    first = out.labels.index(supervised[0])
    assert tok.decode(out.input_ids[first - 1:first]) == ":"  # right after the generation prompt `Assistant:`
    assert tok.convert_ids_to_tokens(supervised[0]).startswith("Ġ")  # one token: " It"


# --- recipe fields -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family_name", FAMILIES)
@pytest.mark.parametrize("key", ["min_pixels", "max_pixels"])
def test_pixel_counts_are_refused_naming_the_size_knobs(family_name, key):
    from vlmtune.modeling import check_runtime

    family = families.get(family_name)
    recipe = load_recipe(family, **{f"data.{key}": 200704})
    (err,) = check_runtime(recipe, family)
    assert err.path == f"data.{key}"
    assert "size.longest_edge" in str(err) and "max_image_size.longest_edge" in str(err)
