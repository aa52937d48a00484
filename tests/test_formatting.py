"""The training signal: ids equal the model's own chat template; only replies and their end token are labels."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlmtune import families
from vlmtune.data.conversation import Conversation, Part, TrainOn, Turn
from vlmtune.data.formatting import IGNORE_INDEX, FormatError, Formatter, template_messages

from .conftest import FAMILIES, REFERENCE


def conv(*turns, source="test.jsonl:1"):
    out = []
    for role, *parts in turns:
        out.append(Turn(role, [Part("image", image=str(p)) if not isinstance(p, str) else Part("text", text=p)
                               for p in parts]))
    return Conversation(out, source=source)


def reference_ids(processor, conversation, image_paths):
    """What the processor itself produces for the same conversation: text, then ids with images expanded."""
    text = processor.apply_chat_template(template_messages(conversation.turns), tokenize=False)
    imgs = [Image.open(p).convert("RGB") for p in image_paths] or None
    batch = processor(text=[text], images=imgs, return_tensors="pt")
    return text, batch["input_ids"][0].tolist()


def counts_for(family, processor, paths):
    return [family.image_layout(processor, *reversed(Image.open(p).size))[0] for p in paths]


CASES = {
    "single": lambda im: conv(("user", im["red"], "What colour is it?"), ("assistant", "It is red.")),
    "multi_turn": lambda im: conv(("user", im["wide"], "Colour?"), ("assistant", "Blue."),
                                  ("user", "And the shape?"), ("assistant", "A wide rectangle.")),
    "multi_image": lambda im: conv(("system", "You look at pictures."),
                                   ("user", im["red"], im["tall"], "Compare them."),
                                   ("assistant", "The first is red, the second green."),
                                   ("user", im["big"], "And this one?"), ("assistant", "Yellow.")),
    "text_only": lambda im: conv(("user", "Say hi."), ("assistant", "Hi!")),
}


@pytest.mark.parametrize("family_name", FAMILIES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_ids_equal_the_processors_chat_template(family_name, case, processor_for, images):
    family, processor = families.get(family_name), processor_for(family_name)
    c = CASES[case](images)
    paths = c.images
    formatter = Formatter(family, processor)
    text, ref = reference_ids(processor, c, paths)
    assert "".join(t for t, _ in formatter.segments(c)) == text
    out = formatter(c, counts_for(family, processor, paths))
    assert out.input_ids == ref
    replies = [t.text for t in c.turns if t.role == "assistant"]
    tok = processor.tokenizer
    supervised = [i for i, lab in zip(out.input_ids, out.labels, strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(supervised) == "".join(r + "<|im_end|>" for r in replies)
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(out.input_ids, out.labels, strict=True))


@pytest.mark.parametrize("family_name", FAMILIES)
def test_masking_strategies_select_their_turns(family_name, processor_for, images):
    family, processor = families.get(family_name), processor_for(family_name)
    c = CASES["multi_image"](images)
    c.turns[2].train = True
    counts = counts_for(family, processor, c.images)
    tok = processor.tokenizer

    def supervised(train_on):
        out = Formatter(family, processor, train_on)(c, counts)
        return out, [i for i, lab in zip(out.input_ids, out.labels, strict=True) if lab != IGNORE_INDEX]

    _, every = supervised(TrainOn.ASSISTANT)
    assert tok.decode(every) == "The first is red, the second green.<|im_end|>Yellow.<|im_end|>"
    _, last = supervised(TrainOn.LAST_ASSISTANT)
    assert tok.decode(last) == "Yellow.<|im_end|>"
    out, everything = supervised(TrainOn.ALL)
    image_id = tok.convert_tokens_to_ids(family.image_token)
    assert len(everything) == sum(1 for i in out.input_ids if i != image_id)
    c.turns[2].train = False
    _, skipped = supervised(TrainOn.ASSISTANT)
    assert tok.decode(skipped) == "Yellow.<|im_end|>"


@pytest.mark.parametrize("family_name", FAMILIES)
def test_system_prompt_from_recipe_replaces_the_default(family_name, processor_for):
    family, processor = families.get(family_name), processor_for(family_name)
    c = conv(("user", "Hi"), ("assistant", "Hello."))
    default = "".join(t for t, _ in Formatter(family, processor).segments(c))
    custom = "".join(t for t, _ in Formatter(family, processor, system_prompt="Be brief.").segments(c))
    assert "You are a helpful assistant." in default
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "helpful" not in custom


def test_image_token_typed_in_text_is_an_error(processor_for, images):
    family, processor = families.get("qwen2_vl"), processor_for("qwen2_vl")
    c = conv(("user", images["red"], "what is <|image_pad|>?"), ("assistant", "x"))
    with pytest.raises(FormatError, match="image placeholders"):
        Formatter(family, processor)(c, counts_for(family, processor, c.images))


# --- property tests over generated conversations -------------------------------------------------------------

SPECIAL_LOOKING = ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|vision_start|>", "<|im_start|>assistant\n",
                   "USER:", "ASSISTANT:", "</s>", "<image>"]
text = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=24),
    st.lists(st.sampled_from(SPECIAL_LOOKING + ["word", " ", "é", "图像", "\n"]), min_size=1, max_size=5).map("".join),
)


@st.composite
def conversations(draw):
    n_pairs = draw(st.integers(1, 4))
    turns = []
    if draw(st.booleans()):
        turns.append(Turn("system", [Part("text", text=draw(text))]))
    counts = []
    for _ in range(n_pairs):
        n_img = draw(st.integers(0, 3))
        parts = [Part("image", image=f"img{len(counts) + k}.png") for k in range(n_img)]
        counts += [draw(st.integers(1, 6)) for _ in range(n_img)]
        parts.insert(draw(st.integers(0, len(parts))), Part("text", text=draw(text)))
        turns.append(Turn("user", parts))
        reply = draw(text.filter(lambda s: s.strip()))
        turns.append(Turn("assistant", [Part("text", text=reply)], train=draw(st.booleans()) or _ == n_pairs - 1))
    return Conversation(turns, source="gen:1"), counts, draw(st.sampled_from(list(TrainOn)))


def expand(ids, image_id, counts):
    out, k = [], 0
    for i in ids:
        if i == image_id:
            out += [image_id] * counts[k]
            k += 1
        else:
            out.append(i)
    return out


@pytest.mark.parametrize("family_name", FAMILIES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=conversations())
def test_generated_conversations_supervise_exactly_the_replies(family_name, processor_for, case):
    c, counts, train_on = case
    family, processor = families.get(family_name), processor_for(family_name)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(family.image_token)
    out = Formatter(family, processor, train_on)(c, counts)
    ids, labels = out.input_ids, out.labels

    # Same ids as the template rendered and tokenized whole, except that each reply starts on a token
    # boundary (as at generation time): equal whenever no reply starts with whitespace.
    rendered = processor.apply_chat_template(template_messages(c.turns), tokenize=False)
    whole = expand(tok(rendered, add_special_tokens=False)["input_ids"], image_id, counts)
    replies = [t for t in c.turns if t.role == "assistant"]
    if not any(r.text[:1].isspace() for r in replies):
        assert ids == whole
    assert tok.decode(ids) == tok.decode(whole)

    # no image token is ever a label; labels are either ignored or equal to the id
    assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels, strict=True) if i == image_id)
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels, strict=True))
    supervised = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
    if train_on is TrainOn.ALL:
        assert supervised == tok.decode([i for i in ids if i != image_id])
        return
    chosen = [r for r in replies if r.train]
    if train_on is TrainOn.LAST_ASSISTANT:
        chosen = [r for r in replies[-1:] if r.train]
    assert supervised == "".join(r.text + "<|im_end|>" for r in chosen)


# --- conformance with the real Qwen2.5-VL tokenizer and template ----------------------------------------------

@pytest.fixture(scope="module")
def real_qwen_processor():
    ref = REFERENCE / "qwen2_5_vl_7b_instruct"
    if not ref.is_dir():
        pytest.skip("../shared/reference is not present")
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(ref)


@pytest.mark.parametrize("case", sorted(CASES))
def test_conformance_with_real_qwen2_5_vl_files(case, real_qwen_processor, images):
    family, processor = families.get("qwen2_5_vl"), real_qwen_processor
    c = CASES[case](images)
    text, ref = reference_ids(processor, c, c.images)
    out = Formatter(family, processor)(c, counts_for(family, processor, c.images))
    assert out.input_ids == ref
    supervised = [i for i, lab in zip(out.input_ids, out.labels, strict=True) if lab != IGNORE_INDEX]
    replies = [t.text for t in c.turns if t.role == "assistant"]
    assert processor.tokenizer.decode(supervised) == "".join(r + "<|im_end|>" for r in replies)
    assert supervised.count(151645) == len(replies)  # <|im_end|> id in the real vocabulary


def test_real_qwen_448px_image_gives_256_tokens(real_qwen_processor):
    n, grid = families.get("qwen2_5_vl").image_layout(real_qwen_processor, 448, 448)
    assert (n, grid) == (256, (1, 32, 32))


# --- positions ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family_name", FAMILIES)
def test_mrope_positions_equal_the_models_own(family_name, model_dir, processor_for, images):
    from transformers import AutoModelForImageTextToText

    family, processor = families.get(family_name), processor_for(family_name)
    model = AutoModelForImageTextToText.from_pretrained(model_dir(family_name))
    c = CASES["multi_image"](images)
    _, _ = reference_ids(processor, c, c.images)
    text = processor.apply_chat_template(template_messages(c.turns), tokenize=False)
    batch = processor(text=[text], images=[Image.open(p).convert("RGB") for p in c.images], return_tensors="pt")
    expected, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                             image_grid_thw=batch["image_grid_thw"])
    ours = family.position_ids(batch["input_ids"][0], batch["image_grid_thw"].tolist(), processor)
    assert torch.equal(ours, expected[:, 0])
