"""LLaVA-NeXT with the real chat templates of its Llama-3 and Mistral checkpoints, LLaVA-OneVision with its real
template: the template's own end of turn is supervised once, nothing is appended, and inspect says so.

The real Llama-3 and Mistral checkpoints are 8B/7B: here their templates (../shared/reference/templates) run on the
tiny LLaVA-NeXT processor, whose Llama-style tokenizer gets the Llama-3 special tokens the template writes.
"""

from __future__ import annotations

import copy
import itertools
import shutil

import pytest

import vlmtune
from vlmtune import families
from vlmtune.data.formatting import IGNORE_INDEX, Formatter
from vlmtune.inspection import inspect

from .conftest import REFERENCE, write_jsonl
from .test_formatting import CASES, reference_ids, shown_reply, supervised_runs, texts_for

TEMPLATES = REFERENCE / "templates"
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# checkpoint -> (template file, family, the token that ends each reply there)
VARIANTS = {
    "llama3-llava-next-8b": ("llama3-llava-next-8b-hf.jinja", "llava_next", "<|eot_id|>"),
    "llava-v1.6-mistral-7b": ("llava-v1.6-mistral-7b-hf.jinja", "llava_next", "</s>"),
    "llava-onevision-qwen2-7b-ov": ("llava-onevision-qwen2-7b-ov-hf.jinja", "llava_onevision", "<|im_end|>"),
}


@pytest.fixture(scope="module")
def variant(processor_for):
    """checkpoint -> (family, the tiny processor of its family with that checkpoint's real template, end token)."""
    cache = {}

    def get(name):
        file, family_name, end = VARIANTS[name]
        if not (TEMPLATES / file).is_file():
            pytest.skip("../shared/reference is not present")
        if name not in cache:
            processor = copy.deepcopy(processor_for(family_name))
            if end == "<|eot_id|>":
                processor.tokenizer.add_tokens(LLAMA3_TOKENS, special_tokens=True)
            processor.chat_template = (TEMPLATES / file).read_text(encoding="utf-8")
            cache[name] = families.get(family_name), processor, end
        return cache[name]

    return get


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_the_real_templates_end_of_turn_is_supervised_once_and_nothing_appended(name, case, variant, images):
    family, processor, end = variant(name)
    c = CASES[case](images)
    text, ref = reference_ids(processor, c, c.images)
    out = Formatter(family, processor)(c, texts_for(family, processor, c.images))
    tok = processor.tokenizer
    replies = [t.text for t in c.turns if t.role == "assistant"]
    end_id = tok.convert_tokens_to_ids(end)
    assert out.input_ids == ref  # no `</s>` of vlmtune's: the template's own end token is there
    assert supervised_runs(tok, out.input_ids, out.labels) == [shown_reply(processor, r) + end for r in replies]
    supervised = [i for i, lab in zip(out.input_ids, out.labels, strict=True) if lab != IGNORE_INDEX]
    assert supervised.count(end_id) == len(replies)  # once per reply
    assert out.input_ids.count(end_id) == tok(text)["input_ids"].count(end_id)  # as many as the template wrote
    if end != tok.eos_token:
        assert tok.eos_token_id not in out.input_ids


def test_a_reply_is_followed_by_exactly_one_end_token(variant, images):
    """The Llama-3 template writes `<|eot_id|>` after each text part: a reply then ends `<|eot_id|>`, never twice."""
    family, processor, _ = variant("llama3-llava-next-8b")
    out = Formatter(family, processor)(CASES["three_replies"](images), texts_for(family, processor,
                                                                             CASES["three_replies"](images).images))
    eot = processor.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    pairs = list(itertools.pairwise(out.input_ids))
    assert (eot, eot) not in pairs and out.input_ids.count(eot) == 6  # three questions, three replies


# --- inspect: the note that vlmtune appends the EOS, only where it does ------------------------------------------

def model_folder(tmp_path, model_dir, family_name, processor=None):
    """The tiny model's config with `processor` (default: its own): all that inspect reads (no weights)."""
    folder = tmp_path / "model"
    folder.mkdir()
    source = model_dir(family_name)
    shutil.copy(source / "config.json", folder / "config.json")
    if processor is None:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(source)
    processor.save_pretrained(folder)
    return folder


def inspected(tmp_path, folder, family_name, images) -> str:
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "image", "image": str(images["red"])},
                                     {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]}])
    recipe = vlmtune.load_recipe(None, overrides={"model.name_or_path": str(folder), "model.family": family_name,
                                                  "data.train": str(data)})
    return str(inspect(recipe, num=1))


@pytest.mark.parametrize("name", ["llama3-llava-next-8b", "llava-v1.6-mistral-7b"])
def test_inspect_claims_no_appended_eos_where_the_template_ends_the_reply(name, variant, model_dir, tmp_path,
                                                                          images):
    family, processor, end = variant(name)
    shown = inspected(tmp_path, model_folder(tmp_path, model_dir, family.name, processor), family.name, images)
    assert "appends" not in shown and "note:" not in shown
    assert f"Red.{end}]]" in shown  # the template's own end token, supervised


def test_inspect_says_vlmtune_appends_eos_after_a_vicuna_reply(model_dir, tmp_path, images):
    shown = inspected(tmp_path, model_folder(tmp_path, model_dir, "llava"), "llava", images)
    assert "note: the llava chat template ends a reply without an end-of-sequence token, so vlmtune appends </s>" \
        in shown
    assert "Red. </s>]]" in shown or "Red.</s>]]" in shown
