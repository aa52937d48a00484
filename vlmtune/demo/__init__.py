"""Offline demo assets: a tiny Qwen2 tokenizer, tiny random Qwen2-VL models and a synthetic shapes dataset.

Nothing here touches the network. ``python -m vlmtune.demo make-data OUT_DIR`` regenerates the shipped
``data_templates/shapes`` folder; ``python -m vlmtune.demo build-model NAME`` prints a builtin model's path.
"""

from ..families.llava import LLAVA_CHAT_TEMPLATE, ONEVISION_CHAT_TEMPLATE
from ..families.qwen2_vl import QWEN_VL_CHAT_TEMPLATE
from .models import BUILTIN_MODELS, build_tiny_model_dir, builtin_model_path
from .shapes import COLOURS, SHAPES, SYSTEM_PROMPT, draw_scene, make_shapes_dataset
from .tokenizers import QWEN2_SPLIT_REGEX, SPECIAL_TOKENS, build_tiny_llama_tokenizer, build_tiny_tokenizer


def _main(argv=None):
    from .__main__ import _main as main

    return main(argv)


__all__ = ["BUILTIN_MODELS", "build_tiny_model_dir", "builtin_model_path", "COLOURS",
           "SHAPES", "SYSTEM_PROMPT", "draw_scene", "make_shapes_dataset", "LLAVA_CHAT_TEMPLATE",
           "ONEVISION_CHAT_TEMPLATE", "QWEN_VL_CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_tiny_llama_tokenizer",
           "build_tiny_tokenizer", "QWEN2_SPLIT_REGEX"]
