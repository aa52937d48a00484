"""Preference data (DPO): both layouts and every container read the same pairs; every family formats a pair with one
prompt and labels only on each reply and its end token; bad rows named by file and row; the token budget."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from vlmtune import families
from vlmtune.config.schema import DataConfig
from vlmtune.data.formatting import IGNORE_INDEX, Formatter
from vlmtune.data.preference import PreparedPairs, prepare_pairs

from .conftest import FAMILIES, write_jsonl
from .test_formatting import end_token, shown_reply, supervised_runs

QUESTION = "What colour is the square?"
# replies that start differently (a word, a digit, punctuation), so a merge across the prompt's end would show
PAIRS = [("The square is red.", "It is blue."), ("3", "No square."), ("Red!", "red")]


def trl_row(image: str | None, chosen: str, rejected: str, question: str = QUESTION) -> dict:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    row = {"prompt": [{"role": "user", "content": content}],
           "chosen": [{"role": "assistant", "content": chosen}],
           "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}]}
    return {**row, "images": [image]} if image else row


def plain_row(image: str, chosen: str, rejected: str) -> dict:
    return {"image": image, "question": QUESTION, "chosen": chosen, "rejected": rejected}


def prepared(path, family_name: str, processor_for, fmt: str = "preference", **data) -> PreparedPairs:
    family = families.get(family_name)
    recipe = SimpleNamespace(data=DataConfig(train=str(path), format=fmt, **{"max_length": 1024, **data}))
    return prepare_pairs(recipe, family, Formatter(family, processor_for(family_name)))


def reply_text(tokenizer, example) -> str:
    ids = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    return tokenizer.decode(ids)


@pytest.fixture(scope="module")
def square(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    Image.new("RGB", (56, 56), (220, 40, 40)).save(root / "red.png")
    return root


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_formats_one_prompt_and_labels_only_each_reply(name, square, processor_for):
    path = write_jsonl(square / f"{name}.jsonl", [trl_row("red.png", c, r) for c, r in PAIRS])
    data = prepared(path, name, processor_for)
    assert not data.problems and len(data.pairs) == len(PAIRS)
    family, processor = families.get(name), processor_for(name)
    tokenizer = processor.tokenizer
    for pair, texts in zip(data.pairs, PAIRS, strict=True):
        n = pair.prompt_length
        assert pair.chosen.input_ids[:n] == pair.rejected.input_ids[:n]  # one prompt, token for token
        assert pair.chosen.media == pair.rejected.media and pair.chosen.grids == pair.rejected.grids
        for example, text in zip((pair.chosen, pair.rejected), texts, strict=True):
            supervised = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
            assert supervised == list(range(n, supervised[-1] + 1))  # one run, right after the prompt
            # exactly the reply (as SFT's conformance tests show it) and its end-of-turn token
            assert supervised_runs(tokenizer, example.input_ids, example.labels) == [
                shown_reply(processor, text) + end_token(family, tokenizer)]
            (start, end, kind), = example.media  # the image: whole, in the prompt, never a label
            assert kind == "image" and end <= n and end - start == example.media_tokens("image") > 0
            assert all(example.labels[i] == IGNORE_INDEX for i in range(start, end))


def test_assistant_turns_of_the_prompt_and_a_system_prompt_are_never_labels(tmp_path, processor_for):
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello, how can I help?"},
                      {"role": "user", "content": "Name a colour."}],
           "chosen": "Green", "rejected": "Spoon"}
    data = prepared(write_jsonl(tmp_path / "d.jsonl", [row]), "qwen2_vl", processor_for)
    tokenizer = processor_for("qwen2_vl").tokenizer
    pair, = data.pairs
    assert [reply_text(tokenizer, e) for e in (pair.chosen, pair.rejected)] == ["Green<|im_end|>", "Spoon<|im_end|>"]
    assert "Hello, how can I help?" in tokenizer.decode(pair.chosen.input_ids[:pair.prompt_length])


def test_bad_rows_are_all_named_by_file_and_row(square, processor_for):
    rows = [trl_row("red.png", "Red.", "Blue."),  # 1: fine
            trl_row("red.png", "Red.", " Red. "),  # 2: the same reply
            trl_row("red.png", "", "Blue."),  # 3: an empty reply
            {**trl_row(None, "a", "b"), "prompt": [{"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": "Hm"}]},  # 4
            trl_row("missing.png", "Red.", "Blue."),  # 5: no such image
            {**trl_row(None, "a", "b"), "chosen": 3},  # 6: a wrong type
            {**trl_row(None, "a", "b"), "chosen": [{"role": "assistant", "content": "a"}] * 2},  # 7: two messages
            {k: v for k, v in trl_row(None, "a", "b").items() if k != "rejected"},  # 8: no rejected
            {"chosen": "a", "rejected": "b"},  # 9: no prompt
            {k: v for k, v in trl_row("red.png", "a", "b").items() if k != "images"},  # 10: a part, no image
            {**trl_row("red.png", "a", "b"), "images": ["red.png", "red.png"]},  # 11: an image without a place
            {**trl_row(None, "a", "b"), "chosen": [{"role": "user", "content": "a"}]}]  # 12: not an assistant
    path = write_jsonl(square / "bad.jsonl", rows)
    data = prepared(path, "qwen2_vl", processor_for)
    assert len(data.pairs) == 1 and data.rows == len(rows)
    found = {p.row: p.message for p in data.problems}
    assert all(p.file == str(path) for p in data.problems)
    expected = {2: "are the same reply", 3: "chosen message 0: the assistant reply is empty",
                4: "prompt message 1: the prompt ends with an assistant turn", 5: "image not found",
                6: '"chosen" must be a string or a non-empty list', 7: '"chosen" holds 2 messages',
                8: 'missing "rejected"', 9: 'missing "prompt"', 10: 'the row has no "images"',
                11: "1 image parts", 12: "chosen message 0: role 'user'"}
    assert found.keys() == expected.keys(), found
    for row, words in expected.items():
        assert words in found[row], (row, found[row])


def test_plain_rows_name_their_fields(square, processor_for):
    rows = [plain_row("red.png", "Red.", "Blue."), plain_row("red.png", "Red.", "Red."),
            plain_row("red.png", "Red.", ""), {**plain_row("red.png", "a", "b"), "question": ["?"]},
            {k: v for k, v in plain_row("red.png", "a", "b").items() if k != "image"}]
    data = prepared(write_jsonl(square / "plain-bad.jsonl", rows), "qwen2_vl", processor_for, fmt="preference_plain")
    found = {p.row: p.message for p in data.problems}
    assert found == {2: '"chosen" and "rejected" are the same reply, so there is nothing to prefer; fix the row or '
                        'leave it out', 3: '"rejected" is empty: there is nothing to train on',
                     4: "\"question\" must be a string, got ['?']", 5: 'missing "image"'}


def test_both_layouts_and_every_container_read_the_same_pairs(square, processor_for):
    import datasets

    trl = [trl_row("red.png", c, r) for c, r in PAIRS]
    plain = [plain_row("red.png", c, r) for c, r in PAIRS]
    (square / "same.json").write_text(json.dumps(trl))
    datasets.Dataset.from_list(trl).to_parquet(str(square / "same.parquet"))
    absolute = [{**r, "images": [str(square / "red.png")]} for r in trl]  # a folder's own paths are inside it
    datasets.Dataset.from_list(absolute).save_to_disk(str(square / "same-dataset"))
    embedded = (square / "red.png").read_bytes()
    renamed = [{"img": embedded, "q": r["question"], "good": r["chosen"], "bad": r["rejected"]} for r in plain]
    datasets.Dataset.from_list(renamed).to_parquet(str(square / "plain.parquet"))
    sources = [("same.jsonl", "preference", {}), ("same.json", "preference", {}),
               ("same.parquet", "preference", {}), ("same-dataset", "preference", {}),
               ("plain.jsonl", "preference_plain", {}),
               ("plain.parquet", "preference_plain",
                {"columns": {"image": "img", "question": "q", "chosen": "good", "rejected": "bad"}})]
    write_jsonl(square / "same.jsonl", trl)
    write_jsonl(square / "plain.jsonl", plain)
    seen = []
    for name, fmt, extra in sources:
        data = prepared(square / name, "qwen2_vl", processor_for, fmt=fmt, **extra)
        assert not data.problems and not data.warnings, (name, data.problems, data.warnings)
        seen.append([(p.chosen.input_ids, p.chosen.labels, p.rejected.input_ids, p.rejected.labels)
                     for p in data.pairs])
    assert len(seen[0]) == len(PAIRS) and all(s == seen[0] for s in seen[1:])


def budget_rows(square) -> Path:
    Image.new("RGB", (224, 224), (40, 80, 220)).save(square / "big.png")
    long = "It is a very long and winding answer that goes on and on about the colour. " * 3
    return write_jsonl(square / "budget.jsonl", [trl_row("big.png", "Blue.", long), trl_row("big.png", "Blue.", "Red.")])


def test_budget_counts_the_prompt_and_the_longer_reply(square, processor_for):
    path = budget_rows(square)
    full = prepared(path, "qwen2_vl", processor_for)
    long_pair, short_pair = full.pairs
    limit = max(len(long_pair.chosen.input_ids), short_pair.num_tokens) + 2  # the long rejected reply alone is over
    assert long_pair.num_tokens > limit >= len(long_pair.chosen.input_ids)
    dropped = prepared(path, "qwen2_vl", processor_for, max_length=limit)
    assert [p.row for p in dropped.dropped] == [1] and len(dropped.pairs) == 1 and not dropped.problems
    assert "prompt + the longer reply (rejected)" in dropped.dropped[0].message
    stopped = prepared(path, "qwen2_vl", processor_for, max_length=limit, on_overlong="error")
    assert [p.row for p in stopped.problems] == [1] and not stopped.dropped
    shrunk = prepared(path, "qwen2_vl", processor_for, max_length=limit, on_overlong="shrink_images")
    assert not shrunk.dropped and not shrunk.problems and shrunk.shrunk == 1
    pair = shrunk.pairs[0]
    assert pair.chosen.max_pixels == pair.rejected.max_pixels is not None and pair.num_tokens <= limit
    n = pair.prompt_length
    assert pair.chosen.input_ids[:n] == pair.rejected.input_ids[:n]
    image = long_pair.chosen.media_tokens("image")
    assert 0 < pair.chosen.media_tokens("image") < image  # fewer image tokens from a smaller image, never cut ones
    grid = pair.chosen.grids[0]
    assert pair.chosen.media_tokens("image") == grid[0] * grid[1] * grid[2] // 4  # the whole (merged) grid
    family = families.get("qwen2_vl")
    recipe = SimpleNamespace(data=DataConfig(train=str(path), format="preference", max_length=limit))
    found = prepare_pairs(recipe, family, Formatter(family, processor_for("qwen2_vl")), find_shrinkable=True)
    assert [(p.row, p.message) for p in found.shrinkable] == [(1, f"max_pixels={pair.max_pixels}")]  # validate's


TEMPLATES = Path(__file__).resolve().parents[1] / "data_templates"


def template_recipe(name: str, fmt: str):
    from vlmtune.config.schema import ModelConfig, Recipe

    # built in code, not loaded: the recipe's method field belongs to the DPO method, not to the data
    return Recipe(model=ModelConfig(name_or_path="builtin:tiny-qwen2-vl"),
                  data=DataConfig(train=str(TEMPLATES / name), format=fmt, max_length=512))


def test_shipped_templates_read_as_the_same_pairs_and_validate_counts_them(processor_for):
    from vlmtune.validation import validate

    trl = validate(template_recipe("preference-example.jsonl", "preference"))
    plain = validate(template_recipe("preference-plain-example.jsonl", "preference_plain"))
    assert trl.ok and plain.ok, (trl.problems, plain.problems)
    assert trl.render().splitlines()[0].startswith("train: 4 rows -> 4 preference pairs, 4 images")
    assert "tokens per pair (prompt + the longer reply)" in plain.render()

    def ids(report):
        return [(p.chosen.input_ids, p.rejected.input_ids, p.chosen.labels) for p in report.splits["train"].pairs]

    assert ids(trl)[:3] == ids(plain)


def test_inspect_shows_the_prompt_once_and_both_replies_highlighted():
    from vlmtune.pair_inspection import inspect_recipe

    result = inspect_recipe(template_recipe("preference-example.jsonl", "preference"), index=3)
    text = str(result)
    assert text.count("What colour is the square?") == 1 and text.count("<image ×") == 1  # the prompt once
    assert "--- chosen:\n[[The square is green.<|im_end|>]]" in text
    assert "--- rejected:\n[[The square is blue.<|im_end|>]]" in text
    assert "[[The green shape is a square." not in text  # the prompt's assistant turn is no label
    sample, = result.samples
    assert sample.to_json()["chosen"]["input_ids"][:sample.pair.prompt_length] == \
        sample.to_json()["rejected"]["input_ids"][:sample.pair.prompt_length]
    assert "background:#c8f7c5" in result._repr_html_() and "background:#f7c5c5" in result._repr_html_()
    short = template_recipe("preference-example.jsonl", "preference")
    short.data.max_length = 64  # the prompt and either reply: 67 tokens
    text = str(inspect_recipe(short, index=3))
    assert "DROPPED: prompt + the longer reply" in text and "--- rejected:\n[[The square is blue." in text
    sft = inspect_recipe(template_recipe("vqa-example.jsonl", "vqa"), num=1)
    assert type(sft).__name__ == "Inspection" and "[[" in str(sft)  # the SFT view for SFT data


def test_pairs_are_cached_like_sft_examples(monkeypatch):
    import vlmtune.preflight as preflight

    recipe = template_recipe("preference-example.jsonl", "preference")
    _, family, formatter = preflight.formatting_for(recipe)
    first = preflight.check_data(recipe, family, formatter)[0]["train"]
    monkeypatch.setattr(preflight, "prepare_pairs", lambda *a, **k: pytest.fail("prepared again"))
    again = preflight.check_data(recipe, family, formatter)[0]["train"]
    assert isinstance(again, PreparedPairs) and again.pairs == first.pairs and len(again.pairs) == 4
    assert again.summary() == first.summary()


@pytest.mark.parametrize(("reference", "name"), [("qwen2_5_vl_7b_instruct", "qwen2_5_vl"), ("llava_1_5_7b_hf", "llava")])
def test_the_prompt_is_the_real_processors_generation_prompt(reference, name, reference_processor, square):
    """With real tokenizer and template files, a pair's prompt tokens are exactly what the processor makes of the
    prompt before generating, so DPO scores each reply where generation would write it."""
    processor, family = reference_processor(reference), families.get(name)
    path = write_jsonl(square / f"{reference}.jsonl", [trl_row("red.png", " The square is red.", "No square")])
    recipe = SimpleNamespace(data=DataConfig(train=str(path), format="preference", max_length=4096))
    pair, = prepare_pairs(recipe, family, Formatter(family, processor)).pairs
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = processor(text=[text], images=[Image.open(square / "red.png").convert("RGB")])["input_ids"][0]
    assert pair.chosen.input_ids[:pair.prompt_length] == list(expected)
