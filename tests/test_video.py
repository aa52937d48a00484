"""Video for the Qwen families: reading, frame sampling, planning, formatting, positions, and a training step."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from PIL import Image
from transformers.video_utils import VideoMetadata

from vlmtune import families, load_recipe
from vlmtune.config import RecipeError
from vlmtune.data.collator import collator_for
from vlmtune.data.conversation import Conversation, Part, TrainOn, Turn
from vlmtune.data.dataset import to_dataset
from vlmtune.data.formats import RowProblem, read_rows
from vlmtune.data.formatting import IGNORE_INDEX, FormatError, Formatter, template_messages
from vlmtune.data.prepare import iter_rows, plan_images, prepare, video_clips
from vlmtune.data.video import (
    VideoClip,
    VideoProblem,
    apply_video_settings,
    dumps,
    load_frames,
    loads,
    probe,
    sample_indices,
)
from vlmtune.errors import VlmtuneError

from .conftest import FAMILIES, write_jsonl
from .test_formatting import supervised_runs

QWEN = [f for f in FAMILIES if families.get(f).takes_video()]  # every family that takes video
FRAME_SIZE = (90, 60)  # (width, height): 6 x 4 merged patches per temporal patch on the tiny models


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> list[str]:
    """Five frame images, darkest first."""
    root = tmp_path_factory.mktemp("frames")
    out = []
    for k in range(5):
        path = root / f"f{k}.png"
        Image.new("RGB", FRAME_SIZE, (40 * k, 0, 200 - 40 * k)).save(path)
        out.append(str(path))
    return out


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> str:
    """A 2-second, 10 fps, 64x48 MPEG-4 file written with PyAV; frame k has brightness 10 * k."""
    av = pytest.importorskip("av")
    import numpy as np

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 * k, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


def configured(processor, fps=2.0, max_frames=32, **bounds):
    """A copy of a (shared) processor with a recipe's video settings."""
    out = copy.copy(processor)
    out.video_processor = copy.deepcopy(processor.video_processor)
    apply_video_settings(out, families.get("qwen2_vl").pixels, fps, max_frames, **bounds)
    return out


def conv(*turns) -> Conversation:
    out = []
    for role, *parts in turns:
        out.append(Turn(role, [p if isinstance(p, Part) else Part("text", text=p) for p in parts]))
    return Conversation(out, source="test.jsonl:1")


def video(ref) -> Part:
    return Part("video", video=tuple(ref) if isinstance(ref, list) else ref)


def image(path) -> Part:
    return Part("image", image=str(path))


def cases(frames, images):
    return {
        "video": conv(("user", video(frames), "What changes?"), ("assistant", "It turns red.")),
        "mixed": conv(("system", "Watch closely."), ("user", image(images["red"]), video(frames[:3]), "Same colour?"),
                      ("assistant", "No."), ("user", video(frames), image(images["wide"]), "And now?"),
                      ("assistant", "Blue, then red.")),
    }


def plan(family, processor, c):
    plans = plan_images(family, processor, c.images, [Image.open(p).size for p in c.images]) if c.images else []
    return [p.text for p in plans], [p.grid for p in plans], video_clips(family, processor, c.videos, {})


def processor_batch(processor, c, clips):
    """The processor's own output for the conversation, given the frames vlmtune sampled."""
    text = processor.apply_chat_template(template_messages(c.turns), tokenize=False)
    imgs = [Image.open(p).convert("RGB") for p in c.images]
    metadata = [VideoMetadata(total_num_frames=len(clip.indices), fps=clip.frame_rate, frames_indices=list(clip.indices))
                for clip in clips]  # each frame's time in its source (Qwen3-VL writes it)
    return processor(text=[text], images=imgs or None, videos=[load_frames(clip) for clip in clips],
                     return_tensors="pt", video_metadata=metadata, **video_kwargs(processor))


def video_kwargs(processor) -> dict:
    """The video processor's keyword arguments as vlmtune passes them (frames already sampled)."""
    return {"do_sample_frames": False, "cap_pixels_per_frame": bool(processor.video_processor.cap_pixels_per_frame)}


# --- frame sampling ----------------------------------------------------------------------------------------------

def test_frames_are_sampled_at_the_fps_within_the_cap_and_made_even():
    assert sample_indices(100, 25.0, 2.0, 32) == [0, 14, 28, 42, 57, 71, 85, 99]  # 4 s at 2 fps
    assert len(sample_indices(1000, 10.0, 2.0, 32)) == 32  # 200 frames wanted, capped
    assert len(sample_indices(1000, 10.0, 2.0, 31)) == 30  # padding never goes past the cap
    assert sample_indices(30, 10.0, 1.0, 32) == [0, 14, 29, 29]  # 3 frames: the last repeated
    assert sample_indices(5, None, 2.0, 32) == [0, 1, 2, 3, 4, 4]  # a frame list: every frame
    assert sample_indices(9, None, 2.0, 4) == [0, 3, 5, 8]  # ... spread out under the cap
    assert sample_indices(1, None, 2.0, 32) == [0, 0]
    assert sample_indices(3, 30.0, 2.0, 32) == [0, 0]  # 0.1 s: one frame, padded
    for total, fps in ((7, 3.0), (64, 24.0), (11, None)):
        got = sample_indices(total, fps, 2.0, 8)
        assert len(got) % 2 == 0 and len(got) <= 8 and got == sorted(got) and got[-1] < total


def test_a_video_file_is_probed_sampled_and_decoded(clip_file):
    info = probe(clip_file)
    assert (info.frames, info.fps, info.width, info.height) == (20, 10.0, 64, 48)
    indices = sample_indices(info.frames, info.fps, 2.0, 32)
    assert indices == [0, 6, 13, 19]  # 2 s at 2 fps
    decoded = load_frames(VideoClip(clip_file, tuple(indices), (2, 2, 2), 2, 1.0))
    assert [im.size for im in decoded] == [(64, 48)] * 4
    brightness = [im.convert("L").getpixel((32, 24)) for im in decoded]
    assert brightness == pytest.approx([10 * k for k in indices], abs=6)


def test_a_clip_records_the_frame_rate_its_indices_count_in(clip_file, frames, processor_for):
    """Frame k of a clip is at indices[k] / frame_rate seconds: a file's own rate, a frame list's sampling fps."""
    family, processor = families.get("qwen2_vl"), configured(processor_for("qwen2_vl"), fps=3.0)
    from_file, from_list = video_clips(family, processor, [clip_file, tuple(frames)], {})
    assert (from_file.frame_rate, from_list.frame_rate) == (10.0, 3.0)
    assert loads(dumps([from_file, from_list])) == [from_file, from_list]
    written_before = {k: v for k, v in from_file.to_json().items() if k != "frame_rate"}
    assert VideoClip.from_json(written_before).frame_rate is None


def test_a_missing_decoder_is_named(clip_file, monkeypatch, tmp_path, frames, processor_for):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    with pytest.raises(VideoProblem, match=r"PyAV.*pip install 'vlmtune\[video\]'"):
        probe(clip_file)
    assert probe(tuple(frames)).frames == 5  # frame lists need no decoder
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "video", "video": clip_file}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "x"}]}])
    family, processor = families.get("qwen2_vl"), processor_for("qwen2_vl")
    [result] = iter_rows(data, "messages", None, Formatter(family, processor), family, 2048)
    assert result.problem is not None and "pip install 'vlmtune[video]'" in result.problem.message


# --- reading ----------------------------------------------------------------------------------------------------

def test_messages_rows_read_video_files_and_frame_lists(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"},
                                                   {"type": "video", "video": ["a.jpg", "b.jpg"]}]},
                      {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": [{"type": "text", "text": "x"}, {"type": "video", "video": "c.mp4"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": []}]}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "https://x/y.mp4"}]},
                      {"role": "assistant", "content": "x"}]},
    ]
    out = list(read_rows(write_jsonl(tmp_path / "d.jsonl", rows), "messages"))
    assert out[0].videos == [str(tmp_path / "clip.mp4"), (str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"))]
    assert [type(r) for r in out[1:]] == [RowProblem] * 3
    assert "assistant messages cannot contain videos" in out[1].message
    assert "at least one frame" in out[2].message
    assert "local video file path" in out[3].message


def test_frames_of_different_sizes_are_a_row_problem(tmp_path, frames):
    odd = tmp_path / "odd.png"
    Image.new("RGB", (30, 30)).save(odd)
    with pytest.raises(VideoProblem, match="one size"):
        probe((frames[0], str(odd)))


# --- planning ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family_name", QWEN)
@pytest.mark.parametrize("bounds", [{}, {"max_pixels": 28 * 28 * 4}, {"min_pixels": 28 * 28 * 20}])
def test_planned_video_tokens_equal_the_video_processors(family_name, bounds, processor_for):
    family, processor = families.get(family_name), configured(processor_for(family_name), **bounds)
    vp = processor.video_processor
    for n, (w, h) in ((1, (90, 60)), (2, (200, 30)), (5, (33, 100)), (6, (300, 300))):
        tokens, grid = family.video_layout(processor, n + n % 2, h, w)
        # vlmtune's frame count is even (the last frame repeated), as planned
        made = vp(videos=[[Image.new("RGB", (w, h))] * (n + n % 2)], return_tensors="pt", **video_kwargs(processor))
        assert made["video_grid_thw"].tolist() == [list(grid)], (n, w, h)
        assert tokens == math.prod(grid) // vp.merge_size**2 == made["pixel_values_videos"].shape[0] // 4
        if bounds.get("max_pixels") and w == h:  # (an extreme aspect keeps one 28 px patch per side)
            assert grid[1] * grid[2] * 14 * 14 <= bounds["max_pixels"]


def test_the_total_pixel_cap_of_the_processor_is_planned_too(processor_for):
    family, processor = families.get("qwen2_vl"), configured(processor_for("qwen2_vl"))
    processor.video_processor.cap_pixels_per_frame, processor.video_processor.max_video_tokens = True, 40
    tokens, grid = family.video_layout(processor, 8, 300, 300)
    made = processor.video_processor(videos=[[Image.new("RGB", (300, 300))] * 8], return_tensors="pt",
                                     **video_kwargs(processor))
    assert made["video_grid_thw"].tolist() == [list(grid)] and grid[1] * grid[2] < 20 * 20


def test_families_without_video_refuse_it_per_row(tmp_path, frames, processor_for):
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "?"}]},
                      {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}])
    without = [f for f in families.names() if not families.get(f).takes_video()]
    assert without  # (LLaVA-1.5 takes no video)
    for name in without:
        family, processor = families.get(name), processor_for(name)
        out = prepare(data, "messages", None, Formatter(family, processor), family, 4096)
        assert len(out.examples) == 1 and len(out.problems) == 1
        assert "this model family" in out.problems[0].message and "does not take video" in out.problems[0].message
        with pytest.raises(FormatError, match="does not take video"):
            Formatter(family, processor)(conv(("user", video(frames), "?"), ("assistant", "x")), [], [6])


# --- formatting ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family_name", QWEN)
@pytest.mark.parametrize("case", ["video", "mixed"])
def test_ids_equal_the_processors_with_videos(family_name, case, processor_for, frames, images):
    family, processor = families.get(family_name), configured(processor_for(family_name))
    c = cases(frames, images)[case]
    counts, _, clips = plan(family, processor, c)
    out = Formatter(family, processor)(c, counts, [family.video_sequence(processor, clip) for clip in clips])
    ref = processor_batch(processor, c, clips)
    assert out.input_ids == ref["input_ids"][0].tolist()
    assert [list(clip.grid) for clip in clips] == ref["video_grid_thw"].tolist()
    tok = processor.tokenizer
    replies = [t.text + "<|im_end|>" for t in c.turns if t.role == "assistant"]
    assert supervised_runs(tok, out.input_ids, out.labels) == replies


@pytest.mark.parametrize("family_name", QWEN)
@pytest.mark.parametrize("train_on", list(TrainOn))
def test_video_tokens_are_never_labels(family_name, train_on, processor_for, frames, images):
    family, processor = families.get(family_name), configured(processor_for(family_name))
    c = cases(frames, images)["mixed"]
    counts, _, clips = plan(family, processor, c)
    out = Formatter(family, processor, train_on)(c, counts, [family.video_sequence(processor, clip) for clip in clips])
    tok = processor.tokenizer
    vision = {tok.convert_tokens_to_ids(t) for t in ("<|video_pad|>", "<|image_pad|>")}
    assert out.input_ids.count(tok.convert_tokens_to_ids("<|video_pad|>")) == sum(clip.tokens for clip in clips)
    assert all(lab == IGNORE_INDEX for i, lab in zip(out.input_ids, out.labels, strict=True) if i in vision)
    if train_on is TrainOn.ALL:  # everything but the media sequences (Qwen3-VL's hold timestamps too)
        inside = {k for start, end, _ in out.media for k in range(start, end)}
        assert [i for i, lab in zip(out.input_ids, out.labels, strict=True) if lab != IGNORE_INDEX] == \
            [i for k, i in enumerate(out.input_ids) if k not in inside]


def test_a_typed_video_token_is_an_error(processor_for, frames):
    family, processor = families.get("qwen2_vl"), processor_for("qwen2_vl")
    c = conv(("user", video(frames), "what is <|video_pad|>?"), ("assistant", "x"))
    with pytest.raises(FormatError, match="video placeholders"):
        Formatter(family, processor)(c, [], [18])


# --- positions -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_for(model_dir):
    from transformers import AutoModelForImageTextToText

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = AutoModelForImageTextToText.from_pretrained(model_dir(family))
        return cache[family]

    return get


@pytest.mark.parametrize("family_name", QWEN)
@pytest.mark.parametrize("fps", [2.0, 3.0])
def test_positions_equal_the_models_own(family_name, fps, processor_for, model_for, frames, images, clip_file):
    family, processor = families.get(family_name), configured(processor_for(family_name), fps=fps, max_frames=4)
    model = model_for(family_name)
    c = cases(frames, images)["mixed"]
    c.turns[-2].parts.insert(0, video(clip_file))  # a decoded file: its own sampled fps
    counts, _, clips = plan(family, processor, c)
    # 3 frames at `fps`; the 2 s file capped at 4 frames (2 fps); 5 frames thinned to 4
    assert [clip.seconds_per_grid for clip in clips] == pytest.approx([2 / fps, 1.0, 2 / (0.8 * fps)])
    batch = processor_batch(processor, c, clips)
    seconds = torch.tensor([clip.seconds_per_grid for clip in clips], dtype=torch.float32)
    expected, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                             image_grid_thw=batch["image_grid_thw"],
                                             video_grid_thw=batch["video_grid_thw"], second_per_grid_ts=seconds)
    ds = to_dataset([_example(family, processor, c, counts, clips)], family, processor, model.config)
    ours = ds[0]["position_ids"]
    assert torch.equal(ours, expected[:, 0])
    if family.video_time_step is not None:  # Qwen2.5-VL: time positions follow seconds, not patch indices
        assert family.video_time_step(model.config, clips[0].seconds_per_grid) != 1.0


def _example(family, processor, c, counts, clips):
    from vlmtune.data.prepare import Example

    out = Formatter(family, processor)(c, counts, [family.video_sequence(processor, clip) for clip in clips])
    grids = plan(family, processor, c)[1]
    return Example(out.input_ids, out.labels, c.images, grids, c.source, videos=clips)


def test_qwen2_5_video_positions_need_the_model_config(processor_for, frames):
    family, processor = families.get("qwen2_5_vl"), configured(processor_for("qwen2_5_vl"))
    c = conv(("user", video(frames), "?"), ("assistant", "x"))
    counts, _, clips = plan(family, processor, c)
    ds = to_dataset([_example(family, processor, c, counts, clips)], family, processor)
    with pytest.raises(ValueError, match="tokens_per_second"):
        ds[0]


# --- the whole path ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family_name", QWEN)
def test_video_rows_train(family_name, tmp_path, frames, images, clip_file, processor_for, model_for):
    """read -> prepare -> dataset -> collator -> forward + backward on the tiny model."""
    family, processor = families.get(family_name), configured(processor_for(family_name))
    model = model_for(family_name)
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "video", "video": frames},
                                                   {"type": "text", "text": "What changes?"}]},
                      {"role": "assistant", "content": "It turns red."}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": str(images["red"])},
                                                   {"type": "video", "video": clip_file},
                                                   {"type": "text", "text": "Same?"}]},
                      {"role": "assistant", "content": "No, it brightens."}]},
        {"messages": [{"role": "user", "content": "Text only."}, {"role": "assistant", "content": "Fine."}]},
    ])
    prepared = prepare(data, "messages", None, Formatter(family, processor), family, 2048)
    assert not prepared.problems and prepared.num_videos == 2 and "2 videos" in prepared.summary()
    ds = to_dataset(prepared.examples, family, processor, model.config)
    batch = collator_for(family, processor.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    assert batch["video_grid_thw"].tolist() == [list(e.videos[0].grid) for e in prepared.examples if e.videos]
    video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((batch["input_ids"] == video_id).sum()) == batch["pixel_values_videos"].shape[0] // 4
    model.train()
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    vision_grads = [p.grad for n, p in model.named_parameters() if n.startswith(family.vision_prefix + ".")]
    assert any(g is not None and g.abs().sum() > 0 for g in vision_grads)  # the frames reached the model
    model.eval()


def test_a_changed_video_is_caught_when_processed(frames, processor_for):
    family, processor = families.get("qwen2_vl"), configured(processor_for("qwen2_vl"))
    c = conv(("user", video(frames), "?"), ("assistant", "x"))
    counts, _, clips = plan(family, processor, c)
    example = _example(family, processor, c, counts, clips)
    example.videos = [VideoClip(clips[0].source, clips[0].indices, (3, 8, 8), clips[0].tokens, 1.0)]
    with pytest.raises(VlmtuneError, match=r"video processor made grids \[\[3, 4, 6\]\] but \[\[3, 8, 8\]\]"):
        to_dataset([example], family, processor)[0]


# --- recipe ---------------------------------------------------------------------------------------------------------

def test_video_recipe_fields_are_validated(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"messages": []}])
    base = {"model.name_or_path": "builtin:tiny-qwen2-vl", "data.train": str(train)}
    recipe = load_recipe(None, overrides=base)
    assert (recipe.data.video_fps, recipe.data.video_max_frames) == (2.0, 32)
    with pytest.raises(RecipeError) as e:
        load_recipe(None, overrides={**base, "data.video_fps": 0, "data.video_max_frames": 1,
                                     "data.video_min_pixels": 100, "data.video_max_pixels": 50000})
    paths = [err.path for err in e.value.errors]
    assert paths == ["data.video_fps", "data.video_max_frames"]
    from vlmtune.modeling import check_runtime

    small = load_recipe(None, overrides={**base, "data.video_min_pixels": 100})  # below one 28x28 patch
    (err,) = check_runtime(small, families.get("qwen2_vl"))
    assert err.path == "data.video_min_pixels" and "28x28" in err.message
    with pytest.raises(RecipeError, match="data.video_min_pixels: must not exceed"):
        load_recipe(None, overrides={**base, "data.video_min_pixels": 9000, "data.video_max_pixels": 5000})


def test_recipe_video_settings_reach_the_processor(tmp_path):
    from vlmtune.modeling import check_runtime, load_processor

    train = write_jsonl(tmp_path / "t.jsonl", [{"messages": []}])
    recipe = load_recipe(None, overrides={"model.name_or_path": "builtin:tiny-qwen2.5-vl", "data.train": str(train),
                                          "data.video_fps": 1.5, "data.video_max_frames": 8,
                                          "data.video_max_pixels": 28 * 28 * 8})
    vp = load_processor(recipe, families.get("qwen2_5_vl")).video_processor
    assert (vp.fps, vp.max_frames, vp.size["longest_edge"]) == (1.5, 8, 28 * 28 * 8)
    assert check_runtime(recipe, families.get("qwen2_5_vl")) == []
    assert [e.path for e in check_runtime(recipe, families.get("llava"))] == ["data.video_max_pixels"]
