"""InternVL (HF-native): the real template, tiled image sequences, the full processor's pixels, real-vocabulary ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmtune import families
from vlmtune.data.conversation import Conversation, Part, Turn
from vlmtune.data.formatting import FormatError, Formatter
from vlmtune.families.base import default_image_inputs
from vlmtune.families.internvl import INTERNVL_CHAT_TEMPLATE, INTERNVL_TOKENS, internvl_processor

from .conftest import REFERENCE
from .test_formatting import CASES, assert_conforms, conv, reference_ids, texts_for

FAMILY = families.get("internvl")
# (width, height): square, wide, tall, extreme, odd ratios, smaller than a tile
SIZES = [(64, 64), (32, 32), (120, 40), (30, 90), (224, 168), (500, 20), (20, 300), (333, 250), (10, 12)]


@pytest.fixture(scope="module")
def tiny(processor_for):
    return processor_for("internvl")


@pytest.fixture(scope="module")
def real():
    """The real Qwen2 vocabulary with InternVL's tokens, in an InternVL3-hf processor (448 px tiles, 256 each)."""
    ref = REFERENCE / "qwen2_5_vl_7b_instruct"
    if not ref.is_dir():
        pytest.skip("../shared/reference is not present")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref, extra_special_tokens=INTERNVL_TOKENS)
    return internvl_processor(tok, tile=448, image_seq_length=256)


def test_template_is_the_real_one():
    path = REFERENCE / "templates" / "InternVL3-hf.jinja"
    if not path.is_file():
        pytest.skip("../shared/reference is not present")
    assert INTERNVL_CHAT_TEMPLATE == path.read_text(encoding="utf-8")


def expansion(processor, image) -> tuple[str, int]:
    """What the processor writes for one image's placeholder, and how many tiles it makes of the image."""
    out = processor(text=[processor.image_token], images=[[image]], return_tensors="pt")
    return processor.tokenizer.decode(out["input_ids"][0]), out["pixel_values"].shape[0]


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_image_sequence_and_tiles_equal_the_processors(which, request):
    processor = request.getfixturevalue(which)
    for w, h in SIZES:
        (plan,) = FAMILY.plan_images(processor, [(h, w)])
        text, tiles = expansion(processor, Image.new("RGB", (w, h)))
        assert (plan.text, plan.grid) == (text, (tiles,)), (w, h)
        assert plan.tokens == len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]), (w, h)


def test_known_tile_counts(tiny, real):
    """4 tiles + a thumbnail for 64x64 at 32 px tiles; one 448 px tile alone gets no thumbnail (256 tokens)."""
    (plan,) = FAMILY.plan_images(tiny, [(64, 64)])
    assert plan.grid == (5,) and plan.text == "<img>" + "<IMG_CONTEXT>" * 20 + "</img>"
    assert [p.grid for p in FAMILY.plan_images(real, [(448, 448), (448, 896), (300, 1200)])] == [(1,), (3,), (5,)]
    assert FAMILY.plan_images(real, [(448, 448)])[0].tokens == 258


def noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_pixel_inputs_equal_the_full_processors(which, request):
    processor = request.getfixturevalue(which)
    for sizes in ([SIZES[0]], SIZES[2:5]):
        images = [noise(w, h, seed) for seed, (w, h) in enumerate(sizes)]  # every tile differs
        full = processor(text=["".join([processor.image_token] * len(images))], images=[images], return_tensors="pt")
        ours = FAMILY.image_inputs(processor, images, {})
        assert torch.equal(ours["pixel_values"], full["pixel_values"])
        planned = FAMILY.plan_images(processor, [(h, w) for w, h in sizes])
        assert FAMILY.made_grids(ours) == [list(p.grid) for p in planned]
    # the image processor alone does not tile: the default would give one resized view per image
    alone = default_image_inputs(processor, [Image.new("RGB", (120, 40))], {})
    assert alone["pixel_values"].shape[0] == 1 != FAMILY.plan_images(processor, [(40, 120)])[0].grid[0]


def test_the_forward_takes_only_pixel_values():
    import inspect

    from transformers import InternVLForConditionalGeneration

    params = inspect.signature(InternVLForConditionalGeneration.forward).parameters
    assert "pixel_values" in params and "num_patches" not in params
    assert FAMILY.concat_keys == ("pixel_values",)


def test_nothing_depends_on_the_processors_left_padding(tiny, images):
    """The processor pads on the left; vlmtune tokenizes each sample alone and pads itself."""
    short, long = "<|im_start|>user\nHi<|im_end|>\n", "<|im_start|>user\nHello there, how are you?<|im_end|>\n"
    batch = tiny(text=[short, long], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1  # left
    c = CASES["single"](images)
    _, ref = reference_ids(tiny, c, c.images)
    assert Formatter(FAMILY, tiny)(c, texts_for(FAMILY, tiny, c.images)).input_ids == ref


# --- the real Qwen2 vocabulary -------------------------------------------------------------------------------------

def test_real_vocabulary_gives_the_internvl_ids(real):
    tok = real.tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>")] == [151665, 151666, 151667]
    assert real.image_token_id == 151667 and tok.convert_tokens_to_ids("<|im_end|>") == 151645


@pytest.mark.parametrize("case", sorted(CASES))
def test_conformance_with_the_real_qwen2_vocabulary(case, real, images):
    c = CASES[case](images)
    supervised = assert_conforms(FAMILY, real, c, "<|im_end|>")
    replies = [t.text for t in c.turns if t.role == "assistant"]
    assert supervised.count(151645) == len(replies)
    assert not {151665, 151666, 151667} & set(supervised)


# --- what does not apply --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["min_pixels", "max_pixels"])
def test_pixel_bounds_are_refused_naming_the_tile_knobs(key):
    import vlmtune
    from vlmtune.modeling import check_runtime

    from .test_training import SHAPES

    recipe = vlmtune.load_recipe(None, overrides={"model.name_or_path": "builtin:tiny-internvl", f"data.{key}": 3136,
                                                  "data.train": str(SHAPES / "train.jsonl")})
    (err,) = check_runtime(recipe, FAMILY)
    assert err.path == f"data.{key}" and "tile `size`" in str(err) and "max_patches" in str(err)
    assert FAMILY.pixels is None


def test_video_is_refused(tiny):
    c = Conversation([Turn("user", [Part("video", video="clip.mp4"), Part("text", text="?")]),
                      Turn("assistant", [Part("text", text="A clip.")])], source="v.jsonl:1")
    assert not FAMILY.takes_video()
    with pytest.raises(FormatError, match="does not take video"):
        Formatter(FAMILY, tiny)(c)


def test_image_token_typed_in_text_is_an_error(tiny, images):
    c = conv(("user", images["red"], "what is <IMG_CONTEXT>?"), ("assistant", "x"))
    with pytest.raises(FormatError, match="image placeholders"):
        Formatter(FAMILY, tiny)(c, texts_for(FAMILY, tiny, c.images))
