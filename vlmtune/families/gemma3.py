"""Gemma 3 (4B/12B/27B): `<start_of_image>` + 256 soft tokens + `<end_of_image>`, `token_type_ids`, 1-D positions.

Layout (the real chat template, copied below): the template writes `{{ bos_token }}` itself (the formatter then adds
no second BOS), folds a system message into the first user turn, renders the assistant role as `model`, ends every
turn with `<end_of_turn>` (supervised after a reply; the tokenizer's EOS `<eos>` is not what ends a reply) and raises
when roles do not alternate user/assistant (the formatter turns that into a row problem). Gemma3Processor writes
`\\n\\n<start_of_image>` + `<image_soft_token>` x image_seq_length + `<end_of_image>\\n\\n` in place of each
`<start_of_image>` the template writes.

Images: every image is resized to the image processor's fixed `size` (896x896 in the real models) and becomes
image_seq_length (256) soft tokens whatever its size: `data.min_pixels` / `max_pixels` do not apply. Pan-and-scan
crops (`do_pan_and_scan`) are not supported: Gemma3Processor leaves them off unless asked at call time, and vlmtune
never asks; an image processor whose saved config turns them on is refused (each row names the setting).

Training: `token_type_ids` (1 on soft tokens) must reach the model: they give each image's soft tokens their
bidirectional attention; without them the model silently attends causally over the image (another loss).
Attention: sdpa computes what eager does for Gemma 3 (it has no attention-logit soft-capping, the reason Gemma 2
needed eager and the origin of transformers 4.50's "train Gemma3 with eager" warning, since dropped), so `auto`
keeps sdpa; transformers refuses flash_attention_2 for Gemma 3 (it would drop the image mask), and `auto` never
picks it (modeling.takes_flash_attention). Gemma 3 was trained in bfloat16; its activations exceed the float16
range, so float16 is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Family, ImagePlan, LigerPatch

GEMMA_LLM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Byte-identical to google/gemma-3-4b-it's chat template (via TRL's copy; see tests/test_family_gemma3.py).
GEMMA3_CHAT_TEMPLATE = (
    '{{ bos_token }}\n'
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n"
    '\n'
    "' -%}\n"
    '    {%- else -%}\n'
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n"
    '\n'
    "' -%}\n"
    '    {%- endif -%}\n'
    '    {%- set loop_messages = messages[1:] -%}\n'
    '{%- else -%}\n'
    '    {%- set first_user_prefix = "" -%}\n'
    '    {%- set loop_messages = messages -%}\n'
    '{%- endif -%}\n'
    '{%- for message in loop_messages -%}\n'
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    '    {%- endif -%}\n'
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    '    {%- else -%}\n'
    "        {%- set role = message['role'] -%}\n"
    '    {%- endif -%}\n'
    "    {{ '<start_of_turn>' + role + '\n"
    '\' + (first_user_prefix if loop.first else "") }}\n'
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    '            {%- endif -%}\n'
    '        {%- endfor -%}\n'
    '    {%- else -%}\n'
    '        {{ raise_exception("Invalid content type") }}\n'
    '    {%- endif -%}\n'
    "    {{ '<end_of_turn>\n"
    "' }}\n"
    '{%- endfor -%}\n'
    '{%- if add_generation_prompt -%}\n'
    "    {{'<start_of_turn>model\n"
    "'}}\n"
    '{%- endif -%}\n'
)


def gemma3_plan_images(processor, sizes: Sequence[tuple[int, int]]) -> list[ImagePlan]:
    """Each image: the processor's own full image sequence (`\\n\\n<start_of_image>` + soft tokens +
    `<end_of_image>\\n\\n`), image_seq_length soft tokens whatever the image's size."""
    if getattr(processor.image_processor, "do_pan_and_scan", None):
        raise ValueError("this model's image processor turns pan-and-scan on (do_pan_and_scan: true in its "
                         "preprocessor_config.json), which vlmtune does not support for Gemma 3: it trains one "
                         f"{processor.image_seq_length}-token view per image, as Gemma3Processor does by default; set "
                         "do_pan_and_scan to false there")
    text = processor.full_image_sequence
    tokens = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    return [ImagePlan((1,), text, tokens) for _ in sizes]


def gemma3_token_inputs(processor, input_ids: list[int]) -> dict[str, list[int]]:
    """`token_type_ids`: 1 on image soft tokens (their bidirectional attention block), 0 elsewhere."""
    return {"token_type_ids": [int(x) for x in processor.create_mm_token_type_ids([input_ids])[0]]}


# ---------------------------------------------------------------- tiny offline model
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0-3, as in the real Gemma tokenizer
TURN_AND_IMAGE_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                         "<image_soft_token>")
_IMAGE = 32  # px; 8 px patches: 4x4 patches pooled to 2x2 = 4 soft tokens per image


def build_tiny_gemma_tokenizer(vocab_size: int = 1000, chat_template: str | None = None, add_bos: bool = False):
    """A deterministic Gemma-style tokenizer: SentencePiece BPE with byte fallback, spaces as `▁` with no prefix
    space, the real Gemma special, turn and image tokens (boi/eoi/image as the processor reads them).

    `add_bos`: the tokenizer puts `<bos>` in front of every text, as the real one does; the chat template writes
    `<bos>` itself, so transformers' apply_chat_template then tokenizes without it. The builtin model leaves it
    off so that tokenizing a rendered template (`processor(text=...)`, as tests compare) gives that same single
    BOS; tests/test_family_gemma3.py checks the formatter against both."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import TokenizersBackend

    from ..demo.tokenizers import _GENERIC_TEXT, _template_sentences

    trained = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True))
    trained.normalizer = normalizers.Replace(" ", "▁")
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                         special_tokens=[*SPECIAL_TOKENS, *(f"<0x{i:02X}>" for i in range(256))])
    corpus = (_template_sentences() + ["user model"]) * 3 + [line for line in _GENERIC_TEXT.splitlines() if line]
    trained.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    backend = Tokenizer(BPE(vocab=model["vocab"], merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in (*SPECIAL_TOKENS, *TURN_AND_IMAGE_TOKENS)])
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                               special_tokens=[("<bos>", 2)])
    tok = TokenizersBackend(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        add_bos_token=add_bos, add_eos_token=False, clean_up_tokenization_spaces=False, model_max_length=4096,
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
    )  # fmt: skip
    tok.chat_template = chat_template
    return tok


def _tiny_model(config):
    """The model with its image projection initialised: from_config leaves it all zeros, so image features would be
    zero and the vision tower would get no gradient."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, config.initializer_range * 10)
    return model


def tiny_gemma3():
    """Gemma 3 layout: SigLIP tower 32 px / 8 px patches, 2x2 pooled soft tokens, one sliding and one global layer."""
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor

    tok = build_tiny_gemma_tokenizer(chat_template=GEMMA3_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<start_of_image>", "<end_of_image>", "<image_soft_token>")}
    text = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=4096, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"], rms_norm_eps=1e-6, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=_IMAGE, patch_size=8)  # fmt: skip
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                       boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                       image_token_index=ids["<image_soft_token>"])  # fmt: skip
    image = Gemma3ImageProcessor(size={"height": _IMAGE, "width": _IMAGE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = Gemma3Processor(image_processor=image, tokenizer=tok, image_seq_length=4, chat_template=GEMMA3_CHAT_TEMPLATE)
    return cfg, _tiny_model, proc


GEMMA3 = Family(
    name="gemma3",
    model_types=("gemma3",),
    description="Gemma 3 (4B/12B/27B)",
    model_class="Gemma3ForConditionalGeneration",
    vision_prefix="model.vision_tower",
    projector_prefixes=("model.multi_modal_projector",),
    language_prefix="model.language_model",
    default_lora_targets=GEMMA_LLM_LINEAR,
    skip_quantization=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
    image_placeholder="<start_of_image>",
    end_of_turn=("<end_of_turn>",),
    plan_images=gemma3_plan_images,
    size_knob="its image processor's fixed `size` (896x896 in the real models: 256 tokens per image)",
    token_inputs=gemma3_token_inputs,
    token_keys=("token_type_ids",),
    fp16_overflows=True,
    packing_refused=("its image tokens attend to each other both ways (a mask built from token_type_ids), which "
                     "the packed row's position-derived causal blocks do not give: the packed loss differs"),
    # GeGLU, not SwiGLU; Gemma's (1 + weight) RMSNorm is liger's offset form
    liger=LigerPatch("apply_liger_kernel_to_gemma3", ("rms_norm", "layer_norm", "geglu", "rope"),
                     ("liger_kernel.transformers.model.gemma3",)),
    tiny_name="tiny-gemma3",
    build_tiny=tiny_gemma3,
)
FAMILIES = (GEMMA3,)
