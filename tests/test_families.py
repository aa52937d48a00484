"""Every family: registry, module layout, image token counts, batching, and the real LLaVA-1.5 files.

Formatting equality with each family's processor and the property tests run per family in
test_formatting.py; LoRA training steps per family in test_training.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from PIL import Image

from vlmtune import demo, families
from vlmtune.data.collator import collator_for
from vlmtune.data.conversation import Conversation, Part, Turn
from vlmtune.data.dataset import to_dataset
from vlmtune.data.formatting import IGNORE_INDEX, Formatter
from vlmtune.data.prepare import Example
from vlmtune.families import llava

from .conftest import BUILTIN, FAMILIES, REFERENCE
from .test_formatting import CASES, plans_for, reference_ids, supervised_runs, texts_for, without_appended_eos

SIZES = [(56, 56), (120, 40), (30, 90), (224, 168), (500, 20), (333, 250), (20, 300)]  # (width, height)


@pytest.fixture(scope="module")
def model_for(model_dir):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = families.get(family).load_class().from_pretrained(model_dir(family)).eval()
        return cache[family]

    return get


# --- registry --------------------------------------------------------------------------------------------------

def test_registry_rejects_duplicate_names_and_model_types():
    llava = families.get("llava")
    with pytest.raises(ValueError, match="already registered"):
        families.register(dataclasses.replace(llava, model_types=("brand_new",)))
    with pytest.raises(ValueError, match="model_type 'llava' is already handled by family 'llava'"):
        families.register(dataclasses.replace(llava, name="another_llava"))
    assert "another_llava" not in families.names() and families.for_model_type("llava") is llava


def test_unknown_family_error_lists_the_supported_ones():
    with pytest.raises(families.UnknownFamilyError) as e:
        families.get("llava2")
    assert all(name in str(e.value) for name in FAMILIES)
    with pytest.raises(families.UnknownFamilyError, match="llava_onevision"):
        families.for_model_type("no_such_vlm")


@pytest.mark.parametrize("family_name", FAMILIES)
def test_family_describes_its_tiny_model(family_name, model_for):
    family, model = families.get(family_name), model_for(family_name)
    assert families.for_model_type(model.config.model_type) is family
    modules = dict(model.named_modules())
    for prefix in (family.vision_prefix, *family.projector_prefixes, family.language_prefix,
                   *family.skip_quantization):
        assert prefix in modules, prefix
    language_linear = {n.rsplit(".", 1)[-1] for n, m in modules.items()
                       if isinstance(m, torch.nn.Linear) and family.component_of(n) == "language"}
    assert set(family.default_lora_targets) <= language_linear
    other = {n for n, _ in model.named_parameters() if family.component_of(n) == "other"}
    assert other <= {"model.image_newline"}  # anyres row separator, trained with neither part


# --- image plans -----------------------------------------------------------------------------------------------

def processor_ids(processor, images: list) -> list[int]:
    """The processor's own ids for one user turn holding `images` and a question."""
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": "?"}]}],
        tokenize=False)
    return processor(text=[text], images=[images], return_tensors="pt")["input_ids"][0].tolist()


def planned_ids(family, processor, images: list):
    c = Conversation([Turn("user", [Part("image", image=f"{i}.png") for i in range(len(images))]
                           + [Part("text", text="?")])], source="t:1")
    plans = family.plan_images(processor, [(im.height, im.width) for im in images])
    return Formatter(family, processor)(c, [p.text for p in plans]), plans


@pytest.mark.parametrize("family_name", FAMILIES)
def test_image_plans_equal_the_processors_expansion(family_name, processor_for):
    family, processor = families.get(family_name), processor_for(family_name)
    for w, h in SIZES:
        image = Image.new("RGB", (w, h))
        out, (plan,) = planned_ids(family, processor, [image])
        assert out.input_ids == processor_ids(processor, [image]), (w, h)
        assert [(b - a) for a, b, _ in out.media] == [plan.tokens], (w, h)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_multi_image_samples_get_the_processors_expansion(family_name, processor_for):
    family, processor = families.get(family_name), processor_for(family_name)
    imgs = [Image.new("RGB", size) for size in SIZES[:3]]
    out, plans = planned_ids(family, processor, imgs)
    assert out.input_ids == processor_ids(processor, imgs)
    assert [(b - a) for a, b, _ in out.media] == [p.tokens for p in plans]


@pytest.mark.parametrize("family_name", [f for f in FAMILIES if families.get(f).made_grids is not None])
def test_planned_grids_are_what_the_image_processor_reports(family_name, processor_for):
    family, processor = families.get(family_name), processor_for(family_name)
    for sizes in ([SIZES[0]], SIZES[:3]):
        imgs = [Image.new("RGB", size) for size in sizes]
        made = family.made_grids(family.image_inputs(processor, imgs, {}))
        assert made == [list(p.grid) for p in family.plan_images(processor, [(h, w) for w, h in sizes])]


def test_onevision_multi_image_samples_drop_anyres_tiling(processor_for):
    family, processor = families.get("llava_onevision"), processor_for("llava_onevision")
    alone = [family.plan_images(processor, [(h, w)])[0].tokens for w, h in SIZES[:3]]
    together = [p.tokens for p in family.plan_images(processor, [(h, w) for w, h in SIZES[:3]])]
    assert together == [17] * 3 and 17 < min(alone)  # base view + newline per image


# --- batching ---------------------------------------------------------------------------------------------------

def _examples(family, processor, images) -> list[Example]:
    fmt = Formatter(family, processor)
    rows = [[images["wide"]], [images["big"], images["tall"]], [], [images["red"]], [images["big"]]]
    out = []
    for i, paths in enumerate(rows):
        turns = [Turn("user", [Part("image", image=str(p)) for p in paths] + [Part("text", text="q" * (i + 1))]),
                 Turn("assistant", [Part("text", text="The circle is red.")])]
        plans = plans_for(family, processor, paths)
        f = fmt(Conversation(turns, source=f"t:{i}"), [p.text for p in plans])
        out.append(Example(f.input_ids, f.labels, [str(p) for p in paths], [p.grid for p in plans], f"t:{i}",
                           media=f.media))
    return out


def _per_sample_loss(model, batch) -> list[float]:
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels,
                                               ignore_index=IGNORE_INDEX, reduction="none")
    return (losses.sum(1) / (labels != IGNORE_INDEX).sum(1)).tolist()


@pytest.mark.parametrize("family_name", FAMILIES)
def test_a_batch_gives_each_sample_the_loss_it_has_alone(family_name, processor_for, model_for, images):
    family, processor, model = families.get(family_name), processor_for(family_name), model_for(family_name)
    ds = to_dataset(_examples(family, processor, images), family, processor)
    rows = [ds[i] for i in range(len(ds))]
    collate = collator_for(family, processor.tokenizer.pad_token_id)
    batch = collate(rows)
    assert [int(m.sum()) for m in batch["attention_mask"]] == [len(r["input_ids"]) for r in rows]
    for key in family.concat_keys:  # concatenated along dim 0, every other dim zero-padded to the largest
        parts = [r[key] for r in rows if r.get(key) is not None]
        if parts:
            assert batch[key].shape[0] == sum(p.shape[0] for p in parts), key
            assert list(batch[key].shape[1:]) == [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    batched = _per_sample_loss(model, batch)
    alone = [_per_sample_loss(model, collate([r]))[0] for r in rows]
    assert all(math.isfinite(x) for x in batched)
    assert batched == pytest.approx(alone, rel=1e-4, abs=1e-5)


# --- the builtin tiny LLaVA models --------------------------------------------------------------------------------

@pytest.mark.parametrize("family_name", sorted(f.name for f in llava.FAMILIES))
def test_builtin_llava_model_loads_and_runs(family_name, model_dir, model_for, processor_for, images):
    from transformers import GenerationConfig

    path, model, processor = model_dir(family_name), model_for(family_name), processor_for(family_name)
    assert demo.BUILTIN_MODELS[BUILTIN[family_name]] == family_name == model.config.model_type
    tok = processor.tokenizer
    assert model.config.text_config.vocab_size == len(tok)
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>") != tok.unk_token_id
    template = demo.ONEVISION_CHAT_TEMPLATE if family_name == "llava_onevision" else demo.LLAVA_CHAT_TEMPLATE
    assert processor.chat_template == template
    gen = GenerationConfig.from_pretrained(path)
    assert gen.eos_token_id == tok.eos_token_id and gen.pad_token_id == tok.pad_token_id
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Yellow."}]}]
    batch = processor(text=[processor.apply_chat_template(messages, tokenize=False)],
                      images=[[Image.open(images["big"]).convert("RGB")]], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert math.isfinite(out.loss.item()) and out.loss.item() > 0


def test_tiny_llama_tokenizer_matches_the_real_pipeline():
    tok = demo.build_tiny_llama_tokenizer()
    assert [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<0x00>")] == [0, 1, 2, 3]
    assert tok("The circle is red.")["input_ids"][0] == tok.bos_token_id
    assert tok.tokenize("USER: What colour is the circle?")[:3] == ["▁USER:", "▁What", "▁colour"]
    for text in ("héllo 日本 🚀", "  two  spaces", "What?\nYes."):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # as in llava-1.5's tokenizer.json, a `▁` is prepended to the text after a special token
    assert tok.tokenize("a</s>b") == ["▁a", "</s>", "▁b"]
    assert demo.build_tiny_llama_tokenizer().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


# --- conformance with the real LLaVA-1.5 files ----------------------------------------------------------------

@pytest.fixture(scope="module")
def real_llava(reference_processor):
    return reference_processor("llava_1_5_7b_hf")


def test_tiny_llava_template_is_the_real_one(real_llava):
    assert demo.LLAVA_CHAT_TEMPLATE == real_llava.chat_template
    assert families.for_model_type("llava") is families.get("llava")


@pytest.mark.parametrize("case", sorted(CASES))
def test_conformance_with_real_llava_1_5_files(case, real_llava, images):
    family, processor = families.get("llava"), real_llava
    c = CASES[case](images)
    _, ref = reference_ids(processor, c, c.images)
    out = Formatter(family, processor)(c, texts_for(family, processor, c.images))
    replies = [t.text for t in c.turns if t.role == "assistant"]
    assert ref[0] == 1  # the processor's BOS, which the formatter keeps
    assert without_appended_eos(out.input_ids, ref, 2) == (ref, len(replies))  # `</s>` is id 2
    assert supervised_runs(processor.tokenizer, out.input_ids, out.labels) == [r + "</s>" for r in replies]
    supervised = [i for i, lab in zip(out.input_ids, out.labels, strict=True) if lab != IGNORE_INDEX]
    assert supervised.count(2) == len(replies) and supervised[-1] == 2
    assert 32000 not in supervised  # <image>


def test_real_llava_336px_image_gives_576_tokens(real_llava):
    family = families.get("llava")
    (plan,) = family.plan_images(real_llava, [(336, 336)])
    assert (plan.tokens, plan.grid, plan.text) == (576, (336, 336), "<image>" * 576)
    for w, h in ((336, 336), (640, 480), (100, 700)):
        image = Image.new("RGB", (w, h))
        assert family.plan_images(real_llava, [(h, w)])[0].tokens == 576
        assert processor_ids(real_llava, [image]).count(32000) == 576


def test_a_reply_the_template_merges_with_is_tokenized_on_its_own():
    """Qwen's real vocabulary merges the prompt's `\\n` with a reply's leading `\\n`: the reply keeps its own."""
    ref = REFERENCE / "qwen2_5_vl_7b_instruct"
    if not ref.is_dir():
        pytest.skip("../shared/reference is not present")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(ref)
    tok = processor.tokenizer
    c = Conversation([Turn("user", [Part("text", text="Hi")]), Turn("assistant", [Part("text", text="\nx")])])
    out = Formatter(families.get("qwen2_5_vl"), processor)(c, [])
    assert supervised_runs(tok, out.input_ids, out.labels) == ["\nx<|im_end|>"]
    rendered = processor.apply_chat_template([{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "\nx"}], tokenize=False)
    assert tok.decode(out.input_ids) == rendered and out.input_ids != tok(rendered)["input_ids"]


# --- end of turn for other LLaVA-NeXT templates, and what does not apply ----------------------------------------

MISTRAL_LIKE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
                "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
                "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
                "{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                "{{ ' ' + message['content'][0]['text'] + '</s>' }}{% endif %}{% endfor %}")


def test_a_template_that_ends_replies_with_eos_gets_no_second_one(processor_for, images):
    import copy

    family, processor = families.get("llava_next"), copy.copy(processor_for("llava_next"))
    processor.chat_template = MISTRAL_LIKE
    c = CASES["multi_turn"](images)
    _, ref = reference_ids(processor, c, c.images)
    out = Formatter(family, processor)(c, texts_for(family, processor, c.images))
    assert out.input_ids == ref  # nothing appended: the template's own `</s>` is supervised
    replies = [t.text for t in c.turns if t.role == "assistant"]
    assert supervised_runs(processor.tokenizer, out.input_ids, out.labels) == [r + "</s>" for r in replies]


@pytest.mark.parametrize("key", ["min_pixels", "max_pixels"])
def test_pixel_bounds_are_refused_where_they_do_not_apply(key):
    import vlmtune
    from vlmtune.modeling import check_runtime

    from .test_training import SHAPES

    recipe = vlmtune.load_recipe(None, overrides={"model.name_or_path": "builtin:tiny-llava-next", f"data.{key}": 3136,
                                                  "data.train": str(SHAPES / "train.jsonl")})
    assert [e.path for e in check_runtime(recipe, families.get("llava_next"))] == [f"data.{key}"]
    assert check_runtime(recipe, families.get("qwen2_vl")) == []


def test_a_template_that_writes_bos_itself_gets_no_second_bos(processor_for, images):
    import copy

    family, processor = families.get("llava"), copy.copy(processor_for("llava"))
    processor.chat_template = "{{ bos_token }}" + processor.chat_template.removeprefix("{{ bos_token }}")
    c = CASES["multi_turn"](images)
    from vlmtune.data.formatting import template_messages

    text = processor.apply_chat_template(template_messages(c.turns), tokenize=False)
    imgs = [Image.open(p).convert("RGB") for p in c.images]
    # as transformers' apply_chat_template(tokenize=True) does for such templates: no added BOS
    ref = processor(text=[text], images=imgs, add_special_tokens=False)["input_ids"][0]
    out = Formatter(family, processor)(c, texts_for(family, processor, c.images))
    bos = processor.tokenizer.bos_token_id
    assert out.input_ids[:2].count(bos) == 1 and ref[:2].count(bos) == 1
    eos = processor.tokenizer.eos_token_id
    assert [i for i in out.input_ids if i != eos] == [i for i in ref if i != eos]  # but the appended </s>


def test_a_template_that_refuses_a_conversation_is_a_row_problem(processor_for, images):
    import copy

    from vlmtune.data.formatting import FormatError

    family, processor = families.get("llava"), copy.copy(processor_for("llava"))
    processor.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                               "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
                               "{% endif %}{% endfor %}" + processor.chat_template)
    c = CASES["multi_turn"](images)
    c.turns.insert(0, c.turns[0])
    with pytest.raises(FormatError, match="refuses this conversation: Conversation roles must alternate"):
        Formatter(family, processor)(c, texts_for(family, processor, c.images))


def test_a_pixel_bound_below_the_familys_patch_is_refused():
    import vlmtune
    from vlmtune.modeling import check_runtime

    from .test_training import SHAPES

    recipe = vlmtune.load_recipe(None, overrides={"model.name_or_path": "builtin:tiny-qwen2-vl", "data.min_pixels": 100,
                                                  "data.train": str(SHAPES / "train.jsonl")})
    (err,) = check_runtime(recipe, families.get("qwen2_vl"))
    assert err.path == "data.min_pixels" and "multiples of 28x28" in err.message and "784" in err.message


@pytest.mark.parametrize("family_name", [f for f in FAMILIES if families.get(f).pixels is None])
def test_shrinking_images_is_refused_where_the_family_has_no_pixel_bound(family_name):
    import vlmtune
    from vlmtune.modeling import check_runtime

    from .test_training import SHAPES

    family = families.get(family_name)
    recipe = vlmtune.load_recipe(None, overrides={"model.name_or_path": "x/y", "data.on_overlong": "shrink_images",
                                                  "data.train": str(SHAPES / "train.jsonl")})
    (err,) = check_runtime(recipe, family)
    assert err.path == "data.on_overlong" and family.size_knob in err.message
