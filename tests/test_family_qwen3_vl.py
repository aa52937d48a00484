"""Qwen3-VL: the real template, the Qwen3 tokens, DeepStack mergers as projector, per-frame video timestamps,
positions equal to the model's own for images and videos, conformance with the real Qwen2 vocabulary, and the
32x32 pixel floor."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

import vlmtune
from vlmtune import families
from vlmtune.data.dataset import to_dataset
from vlmtune.data.formatting import Formatter, template_messages
from vlmtune.families.qwen3_vl import QWEN3_ADDED_TOKENS, QWEN3_VL_CHAT_TEMPLATE, qwen3_processor
from vlmtune.modeling import check_runtime

from . import test_video
from .conftest import REFERENCE
from .test_formatting import CASES, assert_conforms
from .test_training import SHAPES
from .test_video import _example, cases, configured, plan, processor_batch, video

frames, clip_file = test_video.frames, test_video.clip_file  # its fixtures: five frame images, a 10 fps file

FAMILY = families.get("qwen3_vl")
TEMPLATE_FILE = REFERENCE / "templates" / "Qwen3-VL-2B-Instruct.jinja"
# Qwen/Qwen3-VL-2B-Instruct's published sizes: images 256x256 to 4096x4096 pixels; a video's frames x pixels
REAL_IMAGE_PIXELS = dict(min_pixels=65536, max_pixels=16777216)
REAL_VIDEO_SIZE = {"shortest_edge": 4096, "longest_edge": 25165824}


@pytest.fixture(scope="module")
def processor(processor_for):
    return configured(processor_for("qwen3_vl"))


@pytest.fixture(scope="module")
def model(model_dir):
    return FAMILY.load_class().from_pretrained(model_dir("qwen3_vl")).eval()


def test_the_template_is_the_published_one(processor_for):
    if not TEMPLATE_FILE.is_file():
        pytest.skip("../shared/reference is not present")
    assert QWEN3_VL_CHAT_TEMPLATE == TEMPLATE_FILE.read_text(encoding="utf-8")
    assert processor_for("qwen3_vl").chat_template == QWEN3_VL_CHAT_TEMPLATE
    assert processor_for("qwen3_vl_moe").chat_template == QWEN3_VL_CHAT_TEMPLATE


def test_the_tiny_tokenizer_has_qwen3s_tokens(processor_for):
    tok = processor_for("qwen3_vl").tokenizer
    for token in ("<tool_call>", "</tool_call>", *QWEN3_ADDED_TOKENS, "<|im_end|>", "<|video_pad|>"):
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert tok.eos_token == "<|im_end|>"


def test_deepstack_mergers_are_projector_modules(model):
    deepstack = [n for n, _ in model.named_parameters() if n.startswith("model.visual.deepstack_merger_list.")]
    assert deepstack and {FAMILY.component_of(n) for n in deepstack} == {"projector"}
    assert FAMILY.component_of("model.visual.blocks.0.attn.qkv.weight") == "vision"


# --- video -----------------------------------------------------------------------------------------------------

def test_each_temporal_patch_gets_its_time_in_the_source_as_the_processor_writes(processor, frames, images,
                                                                                  clip_file):
    c = cases(frames, images)["video"]
    c.turns[0].parts.insert(0, video(clip_file))  # 10 fps file at 2 fps: frames 0, 6, 13, 19
    _, _, clips = plan(FAMILY, processor, c)
    ours = [FAMILY.video_sequence(processor, clip) for clip in clips]
    assert [re.findall(r"<([\d.]+) seconds>", text) for text in ours] == [["0.3", "1.6"], ["0.2", "1.2", "2.0"]]
    assert all(text.count("<|vision_start|>") == clip.grid[0] for text, clip in zip(ours, clips, strict=True))
    out = Formatter(FAMILY, processor)(c, [], ours)
    ref = processor_batch(processor, c, clips)  # (without the frame rates it would assume 24 fps)
    assert out.input_ids == ref["input_ids"][0].tolist()


def test_the_per_frame_pixel_cap_is_planned(processor):
    capped = configured(processor)
    capped.video_processor.cap_pixels_per_frame, capped.video_processor.max_video_tokens = True, 4
    for p in (processor, capped):
        tokens, grid = FAMILY.video_layout(p, 8, 300, 300)
        made = FAMILY.video_inputs(p, [[Image.new("RGB", (300, 300))] * 8], [_clip(8)])
        assert made["video_grid_thw"].tolist() == [list(grid)] and tokens == made["pixel_values_videos"].shape[0] // 4
    assert FAMILY.video_layout(capped, 8, 300, 300)[1] == (4, 4, 4) != FAMILY.video_layout(processor, 8, 300, 300)[1]


def _clip(n: int):
    from vlmtune.data.video import VideoClip

    return VideoClip("v.mp4", tuple(range(n)), (n // 2, 4, 4), 4 * n // 2, 1.0, 2.0)


def test_positions_equal_the_models_own_for_images_and_videos(processor, model, frames, images, clip_file):
    c = cases(frames, images)["mixed"]
    c.turns[-2].parts.insert(0, video(clip_file))
    texts, _, clips = plan(FAMILY, processor, c)
    row = to_dataset([_example(FAMILY, processor, c, texts, clips)], FAMILY, processor, model.config)[0]
    batch = processor_batch(processor, c, clips)
    expected, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                             image_grid_thw=batch["image_grid_thw"],
                                             video_grid_thw=batch["video_grid_thw"])
    assert torch.equal(row["position_ids"], expected[:, 0])
    assert row["mm_token_type_ids"].tolist() == batch["mm_token_type_ids"][0].tolist()
    assert sum(clip.grid[0] for clip in clips) == 7  # 2 + 2 + 3 temporal patches, each placed on its own


# --- the real Qwen2 vocabulary ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_processor():
    """The real Qwen2 tokenizer with Qwen3's four added tokens, the published template and sizes."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    ref = REFERENCE / "qwen2_5_vl_7b_instruct"
    if not ref.is_dir() or not TEMPLATE_FILE.is_file():
        pytest.skip("../shared/reference is not present")
    tok = AutoTokenizer.from_pretrained(ref)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_ADDED_TOKENS])
    processor = configured(qwen3_processor(tok, REAL_IMAGE_PIXELS, REAL_VIDEO_SIZE))
    processor.chat_template = TEMPLATE_FILE.read_text(encoding="utf-8")
    return processor


def test_the_real_vocabulary_gives_qwen3s_ids(real_processor):
    assert real_processor.tokenizer.convert_tokens_to_ids(list(QWEN3_ADDED_TOKENS)) == [151665, 151666, 151667, 151668]


@pytest.mark.parametrize("case", sorted(CASES))
def test_conformance_with_the_real_vocabulary(case, real_processor, images):
    c = CASES[case](images)
    supervised = assert_conforms(FAMILY, real_processor, c, "<|im_end|>")
    replies = [t.text for t in c.turns if t.role == "assistant"]
    assert supervised.count(151645) == len(replies)  # <|im_end|> in the real vocabulary


def test_conformance_with_the_real_vocabulary_and_videos(real_processor, frames, images, clip_file):
    c = cases(frames, images)["mixed"]
    c.turns[-2].parts.insert(0, video(clip_file))
    texts, _, clips = plan(FAMILY, real_processor, c)
    out = Formatter(FAMILY, real_processor)(c, texts, [FAMILY.video_sequence(real_processor, clip) for clip in clips])
    ref = processor_batch(real_processor, c, clips)
    assert out.input_ids == ref["input_ids"][0].tolist()
    assert [list(clip.grid) for clip in clips] == ref["video_grid_thw"].tolist()
    text = real_processor.apply_chat_template(template_messages(c.turns), tokenize=False)
    assert "You are a helpful assistant." not in text  # the Qwen3-VL template adds no system turn of its own


# --- recipe fields ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["min_pixels", "video_min_pixels"])
def test_a_pixel_bound_below_32x32_is_refused(key):
    recipe = vlmtune.load_recipe(None, overrides={"model.name_or_path": "builtin:tiny-qwen3-vl", f"data.{key}": 1000,
                                                  "data.train": str(SHAPES / "train.jsonl")})
    (err,) = check_runtime(recipe, FAMILY)
    assert err.path == f"data.{key}" and "32x32" in str(err) and "got 1000" in str(err)
    assert check_runtime(recipe, families.get("qwen2_vl")) == []  # 28x28 there: 1000 holds
