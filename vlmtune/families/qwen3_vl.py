"""Qwen3-VL (dense and MoE): ChatML layout, patch 16 x merge 2, interleaved M-RoPE, DeepStack, timestamped video.

Images are resized to multiples of 32 x 32 pixels (patch 16 x merge 2) within the image processor's pixel bounds;
each becomes a run of `<|image_pad|>`, placed with 3-D (time, row, column) positions as in Qwen2-VL (the model
interleaves the three axes over the rotary frequencies; the positions themselves are the same). A video becomes,
per temporal patch (two frames), `<t seconds>` + `<|vision_start|>` + `<|video_pad|>` run + `<|vision_end|>`, where
t is the mean time of its two frames in the source; each patch is then placed like a one-frame image. The video
processor's pixel bounds hold for the whole clip (frames x height x width), not per frame.
The DeepStack mergers (`model.visual.deepstack_merger_list`) feed vision features into the first text layers:
they are projector modules, like `model.visual.merger`. Everything else (module paths, `<|im_end|>`, the
`mm_token_type_ids` the model requires, batching keys) is as in Qwen2-VL, whose record this one starts from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from .base import Family, LigerPatch
from .qwen2_vl import QWEN2_VL, QWEN_LLM_LINEAR, qwen_mrope_positions, qwen_pixel_knobs, qwen_special_ids

# Byte-identical to Qwen/Qwen3-VL-2B-Instruct's chat template (no default system turn; tools; tool responses).
QWEN3_VL_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen3 adds these to the Qwen2 vocabulary (ids 151665-151668 after Qwen2's `<tool_call>` ... `<|file_sep|>`).
QWEN3_ADDED_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")


# ---------------------------------------------------------------- video
def frame_timestamps(indices: Sequence[int], frame_rate: float, temporal_patch: int) -> list[float]:
    """Seconds into the source of each temporal patch: the mean time of its first and last frame (the last frame
    repeated up to a whole patch), as the processor writes them."""
    idx = list(indices) + [indices[-1]] * (-len(indices) % temporal_patch)
    times = [i / frame_rate for i in idx]
    return [(times[k] + times[k + temporal_patch - 1]) / 2 for k in range(0, len(times), temporal_patch)]


def _frame_rate(clip) -> float:
    if not clip.frame_rate:
        from ..data.video import describe

        raise ValueError(f"{describe(clip.source)}: Qwen3-VL writes each frame's time into the text, which needs "
                         "the clip's frame_rate, and this clip has none")
    return clip.frame_rate


def qwen3_video_text(processor, clip) -> str:
    """`<t seconds><|vision_start|>` + one `<|video_pad|>` per merged patch + `<|vision_end|>`, per temporal patch."""
    vp = processor.video_processor
    _, h, w = clip.grid
    pads = "<|video_pad|>" * (h * w // vp.merge_size**2)
    times = frame_timestamps(clip.indices, _frame_rate(clip), vp.temporal_patch_size)
    return "".join(f"<{s:.1f} seconds><|vision_start|>{pads}<|vision_end|>" for s in times)


def qwen3_video_layout(processor, frames: int, height: int, width: int) -> tuple[int, tuple[int, int, int]]:
    """Video tokens and the (t, h, w) patch grid of `frames` frames of height x width: the pixel bounds hold for
    frames x height x width together (with the processor's optional per-frame cap), as its `resize` does."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    vp = processor.video_processor
    factor = vp.patch_size * vp.merge_size
    low, high = vp.size["shortest_edge"], vp.size["longest_edge"]
    if getattr(vp, "cap_pixels_per_frame", False):
        per_frame = max(min(vp.max_video_tokens * factor * factor, high // frames), int(low * 1.05))
        high = per_frame * frames
    h, w = smart_resize(frames, height, width, temporal_factor=vp.temporal_patch_size, factor=factor,
                        min_pixels=low, max_pixels=high)
    grid = (-(-frames // vp.temporal_patch_size), h // vp.patch_size, w // vp.patch_size)
    return grid[0] * grid[1] * grid[2] // vp.merge_size**2, grid


def clip_metadata(clip, frames: int):
    """The clip's `VideoMetadata` as the processor reads it: the source's frame rate and the frames used."""
    from transformers.video_utils import VideoMetadata

    return VideoMetadata(total_num_frames=frames, fps=_frame_rate(clip), frames_indices=list(clip.indices))


def qwen3_video_inputs(processor, frames: list, clips: list) -> dict:
    """The sampled frames through the video processor, with their metadata (frames are not sampled again)."""
    vp = processor.video_processor
    metadata = [clip_metadata(c, len(f)) for c, f in zip(clips, frames, strict=True)]
    return dict(vp(videos=frames, video_metadata=metadata, do_sample_frames=False, return_metadata=False,
                   cap_pixels_per_frame=bool(vp.cap_pixels_per_frame), return_tensors="pt"))


def qwen3_positions(input_ids: torch.Tensor, image_grids: Sequence[Sequence[int]], processor,
                    videos: Sequence[tuple[Sequence[int], float]] = ()) -> torch.Tensor:
    """M-RoPE positions (3, L): as Qwen2-VL's, with each temporal patch of a video placed as a one-frame image
    (the timestamps between them are text), as Qwen3-VL's own `get_rope_index` does."""
    patches = [((1, h, w), 1.0) for (t, h, w), _ in videos for _ in range(t)]
    return qwen_mrope_positions(input_ids, image_grids, processor, patches)


# ---------------------------------------------------------------- tiny offline models
# mrope_section sums to head_dim / 2; vision out_hidden_size = text hidden_size, num_position_embeddings a square,
# each DeepStack index below the vision depth and no more of them than text layers
_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3], "mrope_interleaved": True},
)  # fmt: skip
_VISION = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=16,
    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0, 1],
)  # fmt: skip
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
_IMAGE_PIXELS = dict(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64)
_VIDEO_SIZE = {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 128}  # frames x height x width


def tiny_qwen3_tokenizer():
    """The tiny Qwen2 BPE with Qwen3's added tokens (plain tokens, as in the real vocabulary) and the real template."""
    from tokenizers import AddedToken

    from ..demo.tokenizers import build_tiny_tokenizer

    tok = build_tiny_tokenizer(chat_template=QWEN3_VL_CHAT_TEMPLATE)
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t in ("<tool_call>", "</tool_call>", *QWEN3_ADDED_TOKENS)])
    return tok


def qwen3_processor(tokenizer, image_pixels: dict = _IMAGE_PIXELS, video_size: dict = _VIDEO_SIZE):
    """A Qwen3VLProcessor around `tokenizer` with the real template: patch 16, merge 2, temporal 2 (the vision
    config's), the real normalisation."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    patches = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**patches, **image_pixels), tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(**patches, size=video_size), chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )  # fmt: skip


def _tiny(prefix: str, text: dict):
    import transformers

    tok = tiny_qwen3_tokenizer()
    ids = qwen_special_ids(tok)
    text = dict(text, vocab_size=len(tok), **{k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    tokens = {k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    cfg = getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=_VISION, tie_word_embeddings=True,
                                                   **tokens)
    return cfg, getattr(transformers, f"{prefix}ForConditionalGeneration"), qwen3_processor(tok)


def tiny_qwen3_vl():
    return _tiny("Qwen3VL", _TEXT)


def tiny_qwen3_vl_moe():
    return _tiny("Qwen3VLMoe", dict(_TEXT, **_MOE))


def _qwen3(name: str, description: str, **kw) -> Family:
    """Qwen2-VL's record with what Qwen3-VL does differently."""
    return replace(
        QWEN2_VL, name=name, model_types=(name,), description=description,
        projector_prefixes=("model.visual.merger", "model.visual.deepstack_merger_list"), pixels=qwen_pixel_knobs(32),
        position_ids=qwen3_positions, video_layout=qwen3_video_layout, video_text=qwen3_video_text,
        video_inputs=qwen3_video_inputs, video_time_step=None,
        image_feature_outputs=("pooler_output", "deepstack_features"), **kw,  # DeepStack feeds the first text layers
    )  # fmt: skip  (float16 stays refused as for Qwen2-VL: nothing shows Qwen3-VL's activations fit its range)


# Liger's Qwen3-VL patch replaces the plain rotation these models call (text and vision); its SwiGLU is off by default
QWEN3_VL = _qwen3("qwen3_vl", "Qwen3-VL (2B/4B/8B/32B)", model_class="Qwen3VLForConditionalGeneration",
                  liger=LigerPatch("apply_liger_kernel_to_qwen3_vl", ("rms_norm", "rope"),
                                   ("liger_kernel.transformers.model.qwen3_vl",)),
                  tiny_name="tiny-qwen3-vl", build_tiny=tiny_qwen3_vl)
# MoE: every text layer's MLP is experts held as fused 3-D parameters (no linear layers): LoRA goes on attention
QWEN3_VL_MOE = _qwen3("qwen3_vl_moe", "Qwen3-VL MoE (30B-A3B/235B-A22B)", default_lora_targets=QWEN_LLM_LINEAR[:4],
                      model_class="Qwen3VLMoeForConditionalGeneration", tiny_name="tiny-qwen3-vl-moe",
                      liger=LigerPatch("apply_liger_kernel_to_qwen3_vl_moe", ("rms_norm", "rope"),
                                       ("liger_kernel.transformers.model.qwen3_vl_moe",)),
                      build_tiny=tiny_qwen3_vl_moe)
FAMILIES = (QWEN3_VL, QWEN3_VL_MOE)
