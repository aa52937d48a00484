"""SmolVLM / SmolVLM2 and Idefics3: images split into tiles with row/column markers plus a global view.

Each image is resized so that its longest edge is the image processor's `size.longest_edge`, then up to
multiples of the tile side (`max_image_size.longest_edge`, the vision tower's image size) and cut into
rows x columns tiles; the processor writes, per tile, `<fake_token_around_image><row_i_col_j>` + `<image>` x
image_seq_len, a newline after each row, then `\\n<fake_token_around_image><global-img>` + `<image>` x
image_seq_len + `<fake_token_around_image>` for the whole image. An image no larger than one tile is the
global view alone. Pixel counts are not a knob here (`data.min_pixels` / `max_pixels` are refused).

The two model types share the processor logic and differ in model class, processor and chat template
(SmolVLM2: `<|im_start|>`, Idefics3: `<|begin_of_text|>`). Replies follow `Assistant:` after a space the
template writes; that space is part of the reply the model generates, so it is supervised with it.
No video: SmolVLM2's video prompt (frame timestamps, spelled-out frame counts, its own sampling) is not planned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .base import Family, ImagePlan, LigerPatch

LLM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Byte-identical to SmolVLM2's image chat template (transformers' SmolVLM processor tests, the hub layout).
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Byte-identical to HuggingFaceM4/Idefics3-8B-Llama3's chat template.
IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

FAKE, IMAGE, GLOBAL, END = "<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"
MAX_GRID = 6  # the real tokenizers have <row_i_col_j> for i, j in 1..6


# ---------------------------------------------------------------- tiles
def tile_grid(image_processor, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of tiles the image processor cuts a height x width image into; (0, 0): the global view alone.

    Follows the processing itself (resize to `size.longest_edge`, then up to multiples of the tile side
    computed from the resized width or height), not `get_number_of_image_patches`, which rounds the short
    side from the image before that second resize: one tile off where `size.longest_edge` is not a multiple
    of the tile side."""
    from transformers.models.smolvlm.image_processing_smolvlm import (
        MAX_IMAGE_SIZE,
        _resize_output_size_rescale_to_max_len,
        _resize_output_size_scale_below_upper_bound,
    )

    ip = image_processor
    tile = ip.max_image_size["longest_edge"]
    if not ip.do_image_splitting:
        return 0, 0
    if ip.do_resize:
        height, width = _resize_output_size_rescale_to_max_len(height, width, max_len=ip.size["longest_edge"])
        height, width = _resize_output_size_scale_below_upper_bound(height, width, max_len=MAX_IMAGE_SIZE)
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    if height > tile or width > tile:
        return math.ceil(height / tile), math.ceil(width / tile)
    return 0, 0


def image_text(rows: int, cols: int, seq_len: int) -> str:
    """What the processor writes in place of one `<image>` placeholder."""
    view = FAKE + GLOBAL + IMAGE * seq_len + FAKE
    if rows == 0 and cols == 0:
        return view
    grid = "".join("".join(f"{FAKE}<row_{r}_col_{c}>" + IMAGE * seq_len for c in range(1, cols + 1)) + "\n"
                   for r in range(1, rows + 1))
    return grid + "\n" + view


def plan_tiles(processor, sizes: Sequence[tuple[int, int]]) -> list[ImagePlan]:
    """One plan per image (images of a sample are independent); the grid is (rows, cols)."""
    tok = processor.tokenizer
    newline, blank = (len(tok(t, add_special_tokens=False)["input_ids"]) for t in ("\n", "\n\n"))
    seq = processor.image_seq_len
    plans = []
    for height, width in sizes:
        rows, cols = tile_grid(processor.image_processor, height, width)
        tokens = seq + 3
        if rows:  # tiles, a newline after each row, the last one joined with the global view's "\n"
            tokens += rows * cols * (seq + 2) + (rows - 1) * newline + blank
        plans.append(ImagePlan((rows, cols), image_text(rows, cols, seq), tokens))
    return plans


def tile_inputs(processor, images: list, kwargs: dict) -> dict:
    """The image processor's outputs for one sample, with the rows/cols it reports (as the processor asks)."""
    return dict(processor.image_processor(images=[images], return_tensors="pt", return_row_col_info=True, **kwargs))


def made_tiles(outputs: dict) -> list | None:
    if "rows" not in outputs:
        return None
    return [[r, c] for rows, cols in zip(outputs["rows"], outputs["cols"], strict=True)
            for r, c in zip(rows, cols, strict=True)]


# ---------------------------------------------------------------- tiny offline models
# A 32 px tile of 8 px patches: 16 patches, pixel-shuffled by 2 into 4 `<image>` tokens; images up to 2 x 2 tiles.
_TILE, _PATCH, _SCALE = 32, 8, 2
_SEQ_LEN = (_TILE // _PATCH) ** 2 // _SCALE**2
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=_TILE,
               patch_size=_PATCH)  # fmt: skip
_LLM = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5)  # fmt: skip
_IMAGE_SIZES = dict(size={"longest_edge": 2 * _TILE}, max_image_size={"longest_edge": _TILE})


def build_tiny_smolvlm_tokenizer(bos: str, eos: str, pad: str, chat_template: str, vocab_size: int = 1000):
    """A deterministic GPT-2 style byte-level BPE (SmolLM2's pipeline) with the SmolVLM / Idefics3 special tokens:
    `bos`, `eos`, `pad`, the image tokens, `<end_of_utterance>` and `<row_i_col_j>` for up to 6 x 6 tiles."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import TokenizersBackend

    from ..demo.tokenizers import _GENERIC_TEXT, _template_sentences

    backend = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False, special_tokens=[],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    corpus = (_template_sentences() + ["User: Assistant: System:"]) * 3 + [t for t in _GENERIC_TEXT.splitlines() if t]
    backend.train_from_iterator(corpus, trainer=trainer)
    rows_cols = [f"<row_{r}_col_{c}>" for r in range(1, MAX_GRID + 1) for c in range(1, MAX_GRID + 1)]
    specials = dict.fromkeys([bos, eos, pad, FAKE, IMAGE, END, GLOBAL, *rows_cols])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok = TokenizersBackend(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                            add_bos_token=False, clean_up_tokenization_spaces=False, model_max_length=8192)  # fmt: skip
    tok.chat_template = chat_template
    return tok


def _configs(tok) -> dict:
    ids = {t: tok.convert_tokens_to_ids(t) for t in (tok.bos_token, tok.eos_token, tok.pad_token)}
    text = dict(_LLM, vocab_size=len(tok), bos_token_id=ids[tok.bos_token], eos_token_id=ids[tok.eos_token],
                pad_token_id=ids[tok.pad_token])  # fmt: skip
    return dict(vision_config=_VISION, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE),
                scale_factor=_SCALE)  # fmt: skip


def tiny_smolvlm():
    """SmolVLM2 layout: SigLIP-style tower, pixel-shuffle connector, Llama LLM (`model.text_model`), ChatML-ish ids."""
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    tok = build_tiny_smolvlm_tokenizer("<|im_start|>", END, "<|im_end|>", SMOLVLM_CHAT_TEMPLATE)
    proc = SmolVLMProcessor(image_processor=SmolVLMImageProcessor(**_IMAGE_SIZES), tokenizer=tok,
                            video_processor=SmolVLMVideoProcessor(**_IMAGE_SIZES), image_seq_len=_SEQ_LEN,
                            chat_template=SMOLVLM_CHAT_TEMPLATE)  # fmt: skip
    return SmolVLMConfig(**_configs(tok)), SmolVLMForConditionalGeneration, proc


def tiny_idefics3():
    """Idefics3 layout: as SmolVLM with Llama-3's `<|begin_of_text|>` written by the template."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    tok = build_tiny_smolvlm_tokenizer("<|begin_of_text|>", END, "<|end_of_text|>", IDEFICS3_CHAT_TEMPLATE)
    proc = Idefics3Processor(image_processor=Idefics3ImageProcessor(**_IMAGE_SIZES), tokenizer=tok,
                             image_seq_len=_SEQ_LEN, chat_template=IDEFICS3_CHAT_TEMPLATE)  # fmt: skip
    return Idefics3Config(**_configs(tok)), Idefics3ForConditionalGeneration, proc


def _family(name: str, description: str, model_class: str, **kw) -> Family:
    return Family(
        name=name,
        model_types=(name,),
        description=description,
        model_class=model_class,
        vision_prefix="model.vision_model",
        projector_prefixes=("model.connector",),
        language_prefix="model.text_model",
        default_lora_targets=LLM_LINEAR,  # the vision tower has q_proj/v_proj too: component_of keeps them out
        skip_quantization=("model.vision_model", "model.connector", "lm_head"),
        image_placeholder=IMAGE,
        end_of_turn=(END,),
        plan_images=plan_tiles,
        image_inputs=tile_inputs,
        made_grids=made_tiles,
        size_knob="its image processor's `size.longest_edge` (every image is resized to it) and "
                  "`max_image_size.longest_edge` (the tile side)",
        concat_keys=("pixel_values", "pixel_attention_mask"),
        encoder_only_keys=("pixel_values", "pixel_attention_mask"),
        **kw,
    )


# Liger patches SmolVLM's vision norms and its language model's own patch (llama); it has none for Idefics3
SMOLVLM = _family("smolvlm", "SmolVLM2 (256M-2.2B)", "SmolVLMForConditionalGeneration", tiny_name="tiny-smolvlm",
                  liger=LigerPatch("apply_liger_kernel_to_smolvlm", ("rms_norm", "layer_norm", "swiglu", "rope"),
                                   ("liger_kernel.transformers.model.smolvlm",)),
                  build_tiny=tiny_smolvlm)
IDEFICS3 = _family("idefics3", "Idefics3 and SmolVLM (v1)", "Idefics3ForConditionalGeneration",
                   tiny_name="tiny-idefics3", build_tiny=tiny_idefics3)
FAMILIES = (SMOLVLM, IDEFICS3)
