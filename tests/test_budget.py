"""Token budget: every sample's length is known before training; image tokens are never cut."""

from __future__ import annotations

import json

from PIL import Image

from vlmtune import families
from vlmtune.data.collator import collator_for
from vlmtune.data.dataset import to_dataset
from vlmtune.data.formatting import Formatter
from vlmtune.data.prepare import prepare


def rows(tmp_path, image_size=(224, 224), n_words=10):
    Image.new("RGB", image_size, (10, 200, 30)).save(tmp_path / "big.png")
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "big.png"},
                                                     {"type": "text", "text": "word " * n_words}]},
                        {"role": "assistant", "content": "green"}]}
    text_only = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(text_only) + "\n")
    return path


def run(path, processor_for, max_length, policy):
    family, processor = families.get("qwen2_vl"), processor_for("qwen2_vl")
    return prepare(path, "messages", None, Formatter(family, processor), family, max_length, policy), processor


def test_lengths_are_known_and_text_only_rows_mix_with_image_rows(tmp_path, processor_for):
    data, processor = run(rows(tmp_path), processor_for, 4096, "drop")
    assert len(data.examples) == 2 and not data.dropped
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert data.examples[0].input_ids.count(image_id) == 64  # 224x224 under the tiny model's 64-token cap
    assert data.examples[1].images == []


def test_drop_reports_the_row_and_keeps_the_rest(tmp_path, processor_for):
    data, _ = run(rows(tmp_path), processor_for, 70, "drop")
    assert [d.row for d in data.dropped] == [1] and len(data.examples) == 1
    assert "do not fit data.max_length=70" in str(data.dropped[0])


def test_error_policy_turns_overlong_rows_into_problems(tmp_path, processor_for):
    data, _ = run(rows(tmp_path), processor_for, 70, "error")
    assert [p.row for p in data.problems] == [1] and not data.dropped


def test_shrink_images_lowers_resolution_until_the_sample_fits(tmp_path, processor_for):
    family = families.get("qwen2_vl")
    data, processor = run(rows(tmp_path), processor_for, 70, "shrink_images")
    assert not data.dropped and data.shrunk == 1
    ex = data.examples[0]
    assert len(ex.input_ids) <= 70 and ex.max_pixels is not None
    assert ex.max_pixels >= processor.image_processor.size["shortest_edge"]
    # the image processor, run under the sample's own bound, makes exactly the planned grid
    batch = collator_for(family, 0)([to_dataset(data.examples, family, processor)[0]])
    (t, h, w), = batch["image_grid_thw"].tolist()
    assert (t, h, w) == tuple(ex.grids[0]) and t * h * w // 4 == ex.input_ids.count(
        processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))


def test_shrink_cannot_go_below_min_pixels(tmp_path, processor_for):
    data, _ = run(rows(tmp_path, n_words=200), processor_for, 60, "shrink_images")
    assert [d.row for d in data.dropped] == [1]


def test_duplicate_rows_are_reported(tmp_path, processor_for):
    path = rows(tmp_path)
    path.write_text(path.read_text() * 2)
    data, _ = run(path, processor_for, 4096, "drop")
    assert [(d.row, d.message) for d in data.duplicates] == [(3, "duplicate of row 1"), (4, "duplicate of row 2")]


def test_notebook_inspect_renders_html(tmp_path, processor_for):
    import vlmtune

    path = rows(tmp_path)
    recipe = vlmtune.load_recipe(None, overrides={"model.name_or_path": "builtin:tiny-qwen2-vl",
                                                  "data.train": str(path)})
    view = vlmtune.inspect(recipe, num=2)
    page = view._repr_html_()
    assert "background:#c8f7c5" in page and "&lt;image ×64&gt;" in page and "green" in page
    assert len(view.samples) == 2
