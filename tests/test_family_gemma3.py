"""Gemma 3: the real template, the image's token sequence, token_type_ids in training, the template's refusals,
the knobs that do not apply, and the attention and dtype choice."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from PIL import Image

import vlmtune
from vlmtune import families
from vlmtune.data.collator import collator_for
from vlmtune.data.conversation import Conversation, Part, Turn
from vlmtune.data.dataset import to_dataset
from vlmtune.data.formatting import IGNORE_INDEX, Formatter, template_messages
from vlmtune.data.prepare import Example, prepare
from vlmtune.families.gemma3 import GEMMA3_CHAT_TEMPLATE, build_tiny_gemma_tokenizer
from vlmtune.modeling import check_runtime, runtime_for

from .conftest import REFERENCE
from .test_formatting import texts_for
from .test_training import SHAPES

FAMILY = families.get("gemma3")


@pytest.fixture(scope="module")
def processor(processor_for):
    return processor_for("gemma3")


@pytest.fixture(scope="module")
def model(model_dir):
    return FAMILY.load_class().from_pretrained(model_dir("gemma3")).eval()


@pytest.fixture(scope="module")
def bos_processor(processor):
    """The tiny processor with a tokenizer that adds `<bos>` to every text, as the real Gemma tokenizer does."""
    from transformers import Gemma3Processor

    tok = build_tiny_gemma_tokenizer(chat_template=GEMMA3_CHAT_TEMPLATE, add_bos=True)
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    return Gemma3Processor(image_processor=processor.image_processor, tokenizer=tok,
                           image_seq_length=processor.image_seq_length, chat_template=GEMMA3_CHAT_TEMPLATE)


def _conv(images, *turns):
    out = []
    for role, *parts in turns:
        out.append(Turn(role, [Part("image", image=str(images[p])) if p in images else Part("text", text=p)
                               for p in parts]))
    return Conversation(out, source="rows.jsonl:3")


def _with_pil(messages: list[dict], paths: list) -> list[dict]:
    """Typed messages with each image part holding its PIL image, for apply_chat_template(tokenize=True)."""
    queue = iter(paths)
    return [{**m, "content": [{"type": "image", "image": Image.open(next(queue)).convert("RGB")}
                              if p["type"] == "image" else p for p in m["content"]]} for m in messages]


def test_the_template_is_the_real_one(processor):
    ref = REFERENCE / "templates" / "gemma-3-4b-it.jinja"
    if not ref.is_file():
        pytest.skip("../shared/reference is not present")
    assert GEMMA3_CHAT_TEMPLATE == ref.read_text(encoding="utf-8")
    assert processor.chat_template == GEMMA3_CHAT_TEMPLATE


def test_an_image_is_the_processors_own_sequence(processor, images):
    tok = processor.tokenizer
    (plan,) = FAMILY.plan_images(processor, [(40, 120)])
    soft = tok.image_token * processor.image_seq_length
    assert plan.text == processor.full_image_sequence == f"\n\n<start_of_image>{soft}<end_of_image>\n\n"
    assert plan.tokens == len(tok(plan.text, add_special_tokens=False)["input_ids"])
    # every size gives the same sequence: one fixed-size view per image
    assert {p.text for p in FAMILY.plan_images(processor, [(20, 300), (224, 168), (56, 56)])} == {plan.text}


def test_ids_and_token_type_ids_equal_the_processors_with_the_real_bos_setting(bos_processor, images):
    """The real tokenizer adds `<bos>` and the template writes it: apply_chat_template keeps one, so do we."""
    c = _conv(images, ("user", "red", "tall", "Compare them."), ("assistant", "Red, then green."),
              ("user", "big", "And this?"), ("assistant", "Yellow."))
    out = Formatter(FAMILY, bos_processor)(c, texts_for(FAMILY, bos_processor, c.images))
    ref = bos_processor.apply_chat_template(_with_pil(template_messages(c.turns), c.images), tokenize=True,
                                            return_dict=True)
    assert out.input_ids == ref["input_ids"][0]
    assert out.input_ids.count(bos_processor.tokenizer.bos_token_id) == 1
    assert FAMILY.token_inputs(bos_processor, out.input_ids)["token_type_ids"] == ref["token_type_ids"][0]
    assert sum(ref["token_type_ids"][0]) == 3 * bos_processor.image_seq_length


def test_a_reply_ends_with_end_of_turn_and_the_assistant_is_model(processor, images):
    c = _conv(images, ("user", "red", "Colour?"), ("assistant", "Red."))
    out = Formatter(FAMILY, processor)(c, texts_for(FAMILY, processor, c.images))
    supervised = [i for i, lab in zip(out.input_ids, out.labels, strict=True) if lab != IGNORE_INDEX]
    assert processor.tokenizer.decode(supervised) == "Red.<end_of_turn>"
    assert "<start_of_turn>model\nRed.<end_of_turn>" in "".join(t for t, _ in Formatter(FAMILY, processor).segments(c))


def test_token_type_ids_reach_the_batch_and_change_the_loss(processor, model, images):
    fmt = Formatter(FAMILY, processor)
    examples = []
    for i, paths in enumerate([["wide"], ["big", "tall"]]):
        c = _conv(images, ("user", *paths, "Colour?"), ("assistant", "Blue and more." * (i + 1)))
        f = fmt(c, texts_for(FAMILY, processor, c.images))
        examples.append(Example(f.input_ids, f.labels, c.images, [(1,)] * len(paths), f"t:{i}", media=f.media))
    batch = collator_for(FAMILY, processor.tokenizer.pad_token_id)(list(to_dataset(examples, FAMILY, processor)))
    image_id = processor.tokenizer.image_token_id
    assert torch.equal(batch["token_type_ids"], (batch["input_ids"] == image_id).long())
    assert int(batch["token_type_ids"].sum()) == 3 * processor.image_seq_length
    with torch.no_grad():
        with_types = model(**batch).loss
        without = model(**{k: v for k, v in batch.items() if k != "token_type_ids"}).loss
    assert math.isfinite(with_types.item()) and abs(with_types.item() - without.item()) > 1e-4


def test_roles_that_do_not_alternate_are_a_row_problem(processor, images, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]},
            {"messages": [{"role": "user", "content": "Hi."}, {"role": "user", "content": "Again."},
                          {"role": "assistant", "content": "Hello."}]}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = prepare(path, "messages", None, Formatter(FAMILY, processor), FAMILY, max_length=512)
    assert len(data.examples) == 1
    (problem,) = data.problems
    assert (problem.file, problem.row) == (str(path), 2)
    assert "the chat template refuses this conversation: Conversation roles must alternate" in problem.message


def test_the_system_prompt_is_folded_into_the_first_user_turn(processor, images):
    c = _conv(images, ("system", "Answer in one word."), ("user", "red", "Colour?"), ("assistant", "Red."),
              ("user", "Sure?"), ("assistant", "Yes."))
    text = "".join(t for t, _ in Formatter(FAMILY, processor).segments(c))
    assert text.startswith("<bos><start_of_turn>user\nAnswer in one word.\n\n<start_of_image>Colour?<end_of_turn>\n")
    assert "system" not in text and text.count("Answer in one word.") == 1
    given = Formatter(FAMILY, processor, system_prompt="Be brief.").segments(Conversation(c.turns[1:], c.source))
    assert "".join(t for t, _ in given).startswith("<bos><start_of_turn>user\nBe brief.\n\n<start_of_image>Colour?")


def _recipe(**overrides):
    return vlmtune.load_recipe(None, overrides={"model.name_or_path": "builtin:tiny-gemma3",
                                                "data.train": str(SHAPES / "train.jsonl"), **overrides})


@pytest.mark.parametrize("key", ["min_pixels", "max_pixels"])
def test_pixel_bounds_are_refused_naming_the_image_processors_size(key):
    (err,) = check_runtime(_recipe(**{f"data.{key}": 200704}), FAMILY)
    assert err.path == f"data.{key}" and "image processor's fixed `size`" in str(err) and "remove it" in str(err)


def test_pan_and_scan_is_refused_naming_the_setting(processor):
    scanning = copy.copy(processor)
    scanning.image_processor = copy.copy(processor.image_processor)
    scanning.image_processor.do_pan_and_scan = True
    with pytest.raises(ValueError, match="do_pan_and_scan: true.*set do_pan_and_scan to false"):
        FAMILY.plan_images(scanning, [(40, 120)])


def test_float16_is_refused():
    assert [e.path for e in check_runtime(_recipe(**{"model.dtype": "float16"}), FAMILY)] == ["model.dtype"]


def test_auto_attention_is_sdpa_even_with_flash_attn_on_a_gpu(monkeypatch):
    """transformers refuses flash_attention_2 for Gemma 3 (it would drop the image block mask): never chosen."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" else find_spec(n, *a))
    assert runtime_for(_recipe(), FAMILY).attn_implementation == "sdpa"
    assert [e.path for e in check_runtime(_recipe(**{"model.attn_implementation": "flash_attention_2"}), FAMILY)
            ] == ["model.attn_implementation"]


def test_sdpa_trains_as_eager_does(processor, model_dir, images):
    """Same loss and gradients with sdpa as with eager on a padded batch with image blocks: nothing calls for
    eager (Gemma 3 has no attention soft-capping)."""
    fmt = Formatter(FAMILY, processor)
    examples = []
    for i, paths in enumerate([["wide", "red"], []]):
        c = _conv(images, ("user", *paths, "Colour?" * (i + 1)), ("assistant", "Blue."))
        f = fmt(c, texts_for(FAMILY, processor, c.images))
        examples.append(Example(f.input_ids, f.labels, c.images, [(1,)] * len(paths), f"t:{i}", media=f.media))
    batch = collator_for(FAMILY, processor.tokenizer.pad_token_id)(list(to_dataset(examples, FAMILY, processor)))
    assert model_dir("gemma3").is_dir()
    results = []
    for attn in ("eager", "sdpa"):
        m = FAMILY.load_class().from_pretrained(model_dir("gemma3"), attn_implementation=attn, dtype=torch.float32)
        m.train()
        loss = m(**batch).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (eager_loss, eager_grads), (sdpa_loss, sdpa_grads) = results
    assert math.isfinite(eager_loss) and sdpa_loss == pytest.approx(eager_loss, rel=1e-5)
    assert eager_grads.keys() == sdpa_grads.keys()
    assert all(torch.allclose(eager_grads[n], sdpa_grads[n], rtol=1e-4, atol=1e-6) for n in eager_grads)
