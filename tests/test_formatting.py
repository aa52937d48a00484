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
from vlmtune.data.prepare import plan_images

from .conftest import FAMILIES


def conv(*turns, source="test.jsonl:1"):
    out = []
    for role, *parts in turns:
        out.append(Turn(role, [Part("image", image=str(p)) if not isinstance(p, str) else Part("text", text=p)
                               for p in parts]))
    return Conversation(out, source=source)


def reference_ids(processor, conversation, image_paths):
    """What the processor itself produces for the same conversation: text, then ids with images expanded."""
    text = processor.apply_chat_template(template_messages(conversation.turns), tokenize=False)
    imgs = [Image.open(p).convert("RGB") for p in image_paths]
    batch = processor(text=[text], images=[imgs] if imgs else None, return_tensors="pt")  # one sample's images
    return text, batch["input_ids"][0].tolist()


def plans_for(family, processor, paths):
    """The family's plan per image of one sample, as training plans them."""
    if not paths:
        return []
    return plan_images(family, processor, [str(p) for p in paths], [Image.open(p).size for p in paths])


def texts_for(family, processor, paths):
    """The text each image of one sample becomes, as training plans it."""
    return [p.text for p in plans_for(family, processor, paths)]


def image_ids(tokenizer, family) -> set[int]:
    """Ids of the tokens an image's sequence may consist of alone (the placeholder)."""
    return {tokenizer.convert_tokens_to_ids(family.image_placeholder)}


def end_token(family, tokenizer) -> str:
    """The token that ends every supervised reply: the template's end of turn, else the appended EOS."""
    return tokenizer.eos_token if family.append_eos_after_reply else "".join(family.end_of_turn)


def appended(family, conversation) -> int:
    """How many EOS tokens the formatter inserts that the template's text does not have (one per reply)."""
    return sum(t.role == "assistant" for t in conversation.turns) if family.append_eos_after_reply else 0


def without_appended_eos(ids, reference, eos_id):
    """`ids` with the EOS tokens that `reference` lacks removed, and how many; (None, 0) if more differs."""
    out, j, skipped = [], 0, 0
    for i in ids:
        if j < len(reference) and i == reference[j]:
            out.append(i)
            j += 1
        elif i == eos_id:
            skipped += 1
        else:
            return None, 0
    return (out if j == len(reference) else None), skipped


def assert_conforms(family, processor, c, end: str) -> list[int]:
    """Our ids equal the processor's own for `c`, and the supervised ids decode to the replies, each + `end`;
    returns the supervised ids."""
    _, ref = reference_ids(processor, c, c.images)
    out = Formatter(family, processor)(c, texts_for(family, processor, c.images))
    assert out.input_ids == ref
    supervised = [i for i, lab in zip(out.input_ids, out.labels, strict=True) if lab != IGNORE_INDEX]
    replies = [t.text for t in c.turns if t.role == "assistant"]
    assert processor.tokenizer.decode(supervised) == "".join(r + end for r in replies)
    return supervised


def roundtrip(tokenizer, text: str) -> str:
    """The text as the tokenizer gives it back (Qwen NFC-normalises; Llama drops one leading space)."""
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])


def shown_reply(processor, reply: str) -> str:
    """A supervised reply as its run of tokens decodes: with the whitespace the template writes between the
    generation prompt and the reply (`Assistant:` + " "), which the model generates and is trained on; a
    decoder that drops a run's leading space (Llama's) shows the reply without it."""
    user = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    prompt = processor.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = processor.apply_chat_template(user + [{"role": "assistant", "content": [{"type": "text", "text": "§"}]}],
                                         tokenize=False)
    tok = processor.tokenizer
    padded = processor.apply_chat_template(user + [{"role": "assistant", "content": [{"type": "text", "text": " § "}]}],
                                           tokenize=False)
    if " § " not in padded:  # the template trims replies (Gemma 3's `| trim`): what it renders is trained on
        reply = reply.strip()
    text = roundtrip(tok, full[len(prompt):full.index("§", len(prompt))] + reply)
    drops_space = tok.decode(tok("\n a", add_special_tokens=False)["input_ids"][-1:]) == "a"
    return text.removeprefix(" ") if drops_space else text


def supervised_runs(tokenizer, ids, labels) -> list[str]:
    """Each run of consecutive supervised tokens, decoded on its own."""
    runs, run = [], []
    for i, lab in [*zip(ids, labels, strict=True), (None, IGNORE_INDEX)]:
        if lab != IGNORE_INDEX:
            run.append(i)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


CASES = {
    "single": lambda im: conv(("user", im["red"], "What colour is it?"), ("assistant", "It is red.")),
    "multi_turn": lambda im: conv(("user", im["wide"], "Colour?"), ("assistant", "Blue."),
                                  ("user", "And the shape?"), ("assistant", "A wide rectangle.")),
    "multi_image": lambda im: conv(("system", "You look at pictures."),
                                   ("user", im["red"], im["tall"], "Compare them."),
                                   ("assistant", "The first is red, the second green."),
                                   ("user", im["big"], "And this one?"), ("assistant", "Yellow.")),
    "text_only": lambda im: conv(("user", "Say hi."), ("assistant", "Hi!")),
    "late_image": lambda im: conv(("user", "I will show you a picture."), ("assistant", "Please do."),
                                  ("user", im["tall"], "What colour is it?"), ("assistant", "Green.")),
    "three_images": lambda im: conv(("user", im["red"], im["wide"], im["tall"], "Which one is blue?"),
                                    ("assistant", "The second one.")),
    "system": lambda im: conv(("system", "Answer in one word."), ("user", im["big"], "Colour?"),
                              ("assistant", "Yellow.")),
    "non_latin": lambda im: conv(("user", im["red"], "这是什么颜色？🎨 Какой это цвет?"),
                                 ("assistant", "红色 🔴, красный, 赤い.")),
    "newlines": lambda im: conv(("user", im["wide"], "List two facts."),
                                ("assistant", "It is blue.\nIt is wide.\n\n- two lines apart")),
    "three_replies": lambda im: conv(("user", im["red"], "Colour?"), ("assistant", "Red."),
                                     ("user", "Shape?"), ("assistant", "A square."),
                                     ("user", "Size?"), ("assistant", "Small.")),
}


def test_every_case_alternates_user_and_assistant(images):
    """Templates such as Gemma 3's refuse anything else; a case they refuse would test nothing."""
    for name, make in CASES.items():
        turns = make(images).turns
        roles = [t.role for t in turns[1:]] if turns[0].role == "system" else [t.role for t in turns]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles, name


@pytest.mark.parametrize("family_name", FAMILIES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_ids_equal_the_processors_chat_template(family_name, case, processor_for, images):
    family, processor = families.get(family_name), processor_for(family_name)
    c = CASES[case](images)
    paths = c.images
    formatter = Formatter(family, processor)
    text, ref = reference_ids(processor, c, paths)
    assert "".join(t for t, _ in formatter.segments(c)) == text
    out = formatter(c, texts_for(family, processor, paths))
    tok = processor.tokenizer
    assert without_appended_eos(out.input_ids, ref, tok.eos_token_id) == (ref, appended(family, c))
    replies = [t.text for t in c.turns if t.role == "assistant"]
    end = end_token(family, tok)
    assert supervised_runs(tok, out.input_ids, out.labels) == [shown_reply(processor, r) + end for r in replies]
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(out.input_ids, out.labels, strict=True))
    assert len(out.media) == len(paths)
    assert all(out.labels[i] == IGNORE_INDEX for a, b, _ in out.media for i in range(a, b))


@pytest.mark.parametrize("family_name", FAMILIES)
def test_masking_strategies_select_their_turns(family_name, processor_for, images):
    family, processor = families.get(family_name), processor_for(family_name)
    c = CASES["multi_image"](images)
    c.turns[2].train = True
    counts = texts_for(family, processor, c.images)
    tok = processor.tokenizer
    end = end_token(family, tok)

    def supervised(train_on):
        out = Formatter(family, processor, train_on)(c, counts)
        return out, supervised_runs(tok, out.input_ids, out.labels)

    def run(reply):
        return shown_reply(processor, reply) + end

    _, every = supervised(TrainOn.ASSISTANT)
    assert every == [run("The first is red, the second green."), run("Yellow.")]
    _, last = supervised(TrainOn.LAST_ASSISTANT)
    assert last == [run("Yellow.")]
    out, _ = supervised(TrainOn.ALL)
    everything = [i for i, lab in zip(out.input_ids, out.labels, strict=True) if lab != IGNORE_INDEX]
    assert everything == [i for k, i in enumerate(out.input_ids) if k not in media_positions(out)]
    c.turns[2].train = False
    _, skipped = supervised(TrainOn.ASSISTANT)
    assert skipped == [run("Yellow.")]


@pytest.mark.parametrize("family_name", FAMILIES)
def test_system_prompt_from_recipe_replaces_the_default(family_name, processor_for):
    family, processor = families.get(family_name), processor_for(family_name)
    c = conv(("user", "Hi"), ("assistant", "Hello."))
    default = "".join(t for t, _ in Formatter(family, processor).segments(c))
    custom = "".join(t for t, _ in Formatter(family, processor, system_prompt="Be brief.").segments(c))
    assert "Be brief." not in default
    with_system = conv(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."))
    assert custom == processor.apply_chat_template(template_messages(with_system.turns), tokenize=False)
    assert "Be brief." in custom and "helpful" not in custom


def test_image_token_typed_in_text_is_an_error(processor_for, images):
    family, processor = families.get("qwen2_vl"), processor_for("qwen2_vl")
    c = conv(("user", images["red"], "what is <|image_pad|>?"), ("assistant", "x"))
    with pytest.raises(FormatError, match="image placeholders"):
        Formatter(family, processor)(c, texts_for(family, processor, c.images))


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
    sizes = []
    for _ in range(n_pairs):
        n_img = draw(st.integers(0, 3))
        parts = [Part("image", image=f"img{len(sizes) + k}.png") for k in range(n_img)]
        sizes += [draw(st.sampled_from(IMAGE_SIZES)) for _ in range(n_img)]
        parts.insert(draw(st.integers(0, len(parts))), Part("text", text=draw(text)))
        turns.append(Turn("user", parts))
        reply = draw(text.filter(lambda s: s.strip()))
        turns.append(Turn("assistant", [Part("text", text=reply)], train=draw(st.booleans()) or _ == n_pairs - 1))
    return Conversation(turns, source="gen:1"), sizes, draw(st.sampled_from(list(TrainOn)))


IMAGE_SIZES = [(56, 56), (40, 120), (120, 40), (64, 96)]  # (height, width)


def media_positions(out) -> set[int]:
    return {i for a, b, _ in out.media for i in range(a, b)}


def expand(rendered: str, placeholder: str, texts: list[str]) -> str:
    """The rendered template with each image placeholder replaced by its text, as the processors do."""
    pieces = rendered.split(placeholder)
    assert len(pieces) == len(texts) + 1
    return "".join(p + t for p, t in zip(pieces, [*texts, ""], strict=True))


@pytest.mark.parametrize("family_name", FAMILIES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=conversations())
def test_generated_conversations_supervise_exactly_the_replies(family_name, processor_for, case):
    c, sizes, train_on = case
    family, processor = families.get(family_name), processor_for(family_name)
    tok = processor.tokenizer
    texts = [p.text for p in family.plan_images(processor, sizes)] if sizes else []
    if any(family.image_placeholder in t.text for t in c.turns):  # typed image tokens are refused, never trained on
        with pytest.raises(FormatError, match="image placeholders"):
            Formatter(family, processor, train_on)(c, texts)
        return
    out = Formatter(family, processor, train_on)(c, texts)
    ids, labels = out.input_ids, out.labels

    # Same ids as the processor's tokenization of the rendered template (its BOS included), plus one EOS
    # per reply where the family appends it; equal whenever no reply starts or ends with whitespace (else
    # a reply may start on a token boundary the whole text does not have, as at generation time).
    rendered = processor.apply_chat_template(template_messages(c.turns), tokenize=False)
    whole = tok(expand(rendered, family.image_placeholder, texts))["input_ids"]
    replies = [t for t in c.turns if t.role == "assistant"]
    eos = tok.eos_token_id
    assert ids.count(eos) - whole.count(eos) == appended(family, c)
    if not any(r.text != r.text.strip() for r in replies):
        assert without_appended_eos(ids, whole, eos) == (whole, appended(family, c))
    assert tok.decode([i for i in ids if i != eos]) == tok.decode([i for i in whole if i != eos])

    # no token of an image is ever a label; labels are either ignored or equal to the id
    assert len(out.media) == len(sizes)
    assert all(labels[i] == IGNORE_INDEX for i in media_positions(out))
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels, strict=True))
    if train_on is TrainOn.ALL:
        inside = media_positions(out)
        assert [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX] == [
            i for k, i in enumerate(ids) if k not in inside]
        return
    chosen = [r for r in replies if r.train]
    if train_on is TrainOn.LAST_ASSISTANT:
        chosen = [r for r in replies[-1:] if r.train]
    end = end_token(family, tok)
    assert supervised_runs(tok, ids, labels) == [shown_reply(processor, r.text) + end for r in chosen]


# --- conformance with the real Qwen2.5-VL tokenizer and template ----------------------------------------------

@pytest.fixture(scope="module")
def real_qwen_processor(reference_processor):
    return reference_processor("qwen2_5_vl_7b_instruct")


@pytest.mark.parametrize("case", sorted(CASES))
def test_conformance_with_real_qwen2_5_vl_files(case, real_qwen_processor, images):
    family, processor = families.get("qwen2_5_vl"), real_qwen_processor
    c = CASES[case](images)
    supervised = assert_conforms(family, processor, c, "<|im_end|>")
    replies = [t.text for t in c.turns if t.role == "assistant"]
    assert supervised.count(151645) == len(replies)  # <|im_end|> id in the real vocabulary


def test_real_qwen_448px_image_gives_256_tokens(real_qwen_processor):
    (plan,) = families.get("qwen2_5_vl").plan_images(real_qwen_processor, [(448, 448)])
    assert (plan.tokens, plan.grid) == (256, (1, 32, 32))
    assert plan.text == "<|image_pad|>" * 256


# --- positions ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family_name", [f for f in FAMILIES if families.get(f).position_ids is not None])
def test_mrope_positions_equal_the_models_own(family_name, model_dir, processor_for, images):
    from transformers import AutoModelForImageTextToText

    family, processor = families.get(family_name), processor_for(family_name)
    model = AutoModelForImageTextToText.from_pretrained(model_dir(family_name))
    c = CASES["multi_image"](images)
    text = processor.apply_chat_template(template_messages(c.turns), tokenize=False)
    batch = processor(text=[text], images=[Image.open(p).convert("RGB") for p in c.images], return_tensors="pt")
    expected, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                             image_grid_thw=batch["image_grid_thw"])
    ours = family.position_ids(batch["input_ids"][0], batch["image_grid_thw"].tolist(), processor)
    assert torch.equal(ours, expected[:, 0])


def test_whether_the_template_renders_tools_is_found_once_per_formatter(processor_for, monkeypatch):
    """The first row with tools renders the conversation with and without them; later rows reuse the answer."""
    import copy

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    turns = [Turn("user", [Part("text", text="Hi")]), Turn("assistant", [Part("text", text="Hello.")])]
    plain, with_tools = Conversation(turns, source="t:1"), Conversation(turns, source="t:2", tools=tools)
    family = families.get("qwen2_vl")
    renders_tools = copy.copy(processor_for("qwen2_vl"))
    renders_tools.chat_template = ("{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n"
                                   "{% endif %}" + renders_tools.chat_template)
    for processor in (renders_tools, processor_for("qwen2_vl")):  # the tiny Qwen2-VL template ignores tools
        formatter = Formatter(family, processor)
        calls = []
        real = formatter.render
        monkeypatch.setattr(formatter, "render",
                            lambda *a, _real=real, _calls=calls, **k: _calls.append(1) or _real(*a, **k))
        formatter.pieces(plain)
        per_row = len(calls)
        for row in range(3):
            calls.clear()
            if processor is renders_tools:
                formatter.pieces(with_tools)
            else:
                with pytest.raises(FormatError, match='the row gives "tools"'):
                    formatter.pieces(with_tools)
            check = 2 if row == 0 else 0  # with and without the tools, once
            assert len(calls) == (per_row if processor is renders_tools else 0) + check


@pytest.mark.parametrize("family_name", FAMILIES)
def test_tokenizing_by_label_runs_gives_the_whole_texts_ids(family_name, processor_for, images):
    """Where a token would straddle a label change the formatter tokenizes run by run; cut only there, the runs
    give the ids of the whole text (each piece alone would not: LLaVA's ` ` + `USER:` is one token)."""
    family, processor = families.get(family_name), processor_for(family_name)
    formatter = Formatter(family, processor)
    for name, case in CASES.items():
        c = case(images)
        pieces, _ = formatter._expand_media(formatter.pieces(c), texts_for(family, processor, c.images), [], c.source)
        whole = formatter._tokenize_whole(pieces)
        assert whole is not None, name
        assert formatter._tokenize_runs(pieces) == whole, name


def test_a_template_that_writes_no_end_token_after_a_reply_is_refused(processor_for):
    import copy

    family, processor = families.get("qwen2_vl"), copy.copy(processor_for("qwen2_vl"))
    processor.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'][0]['text'] }}"
                               "{% if m['role'] != 'assistant' %}<|im_end|>{% endif %}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(FormatError, match=r"message 1: .*none of the end tokens of the qwen2_vl family \(<\|im_end\|>"):
        Formatter(family, processor)(conv(("user", "Hi"), ("assistant", "Hello.")), [])
