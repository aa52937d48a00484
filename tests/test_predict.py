"""predict: prompts formatted as in training, base + adapter equals the merged model, batching, files, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vlmtune
from vlmtune import families
from vlmtune.cli import main
from vlmtune.data.conversation import Conversation, Part, Turn
from vlmtune.inference import encode, generate, load_for_inference, read_prompts

from .conftest import write_jsonl
from .test_merge import BUILTIN_FOR, FAMILIES, QUIET, trained_adapter  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "data_templates" / "shapes"
VIDEO_FAMILIES = [f for f in BUILTIN_FOR if families.get(f).takes_video()]


def image_part(name):
    return {"type": "image", "image": f"images/{name}"}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Shapes eval rows of different lengths, a multi-turn row, a prompt-only row, and a row with two images."""
    rows = [json.loads(line) for line in (SHAPES / "eval.jsonl").read_text().splitlines()[:5]]
    rows.append({"messages": [{"role": "user", "content": [image_part("eval_0006.png"),
                                                           {"type": "text", "text": "How many shapes are there?"}]}]})
    rows.append({"messages": [
        {"role": "user", "content": [image_part("eval_0007.png"), {"type": "text", "text": "Which shape is red?"}]},
        {"role": "assistant", "content": "The red shape is a circle."},
        {"role": "user", "content": "And which is blue? Please answer in one short sentence, as before."},
        {"role": "assistant", "content": "The blue shape is a square."}]})
    rows.append({"messages": [{"role": "user", "content": [image_part("eval_0008.png"), image_part("eval_0009.png"),
                                                           {"type": "text", "text": "How many shapes in total?"}]},
                              {"role": "assistant", "content": "There are 4 shapes in total."}]})
    folder = tmp_path_factory.mktemp("pred-data")
    return write_jsonl(folder / "rows.jsonl", rows)


@pytest.fixture(scope="module")
def merged(trained_adapter, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("merged") / "qwen2_vl"
    vlmtune.merge_adapter(trained_adapter("qwen2_vl"), out, check=False, **QUIET)
    return out


def test_prompts_are_the_training_tokens_up_to_the_reply(trained_adapter, data_file):  # noqa: F811
    from vlmtune.data.formatting import IGNORE_INDEX
    from vlmtune.data.images import image_size
    from vlmtune.data.prepare import format_example

    loaded = load_for_inference(trained_adapter("qwen2_vl"))
    prompts = read_prompts(data_file, image_root=str(SHAPES))
    assert [p.reference is None for p in prompts] == [False] * 5 + [True, False, False]
    assert prompts[6].reference == "The blue shape is a square." and len(prompts[6].turns) == 3
    for p in prompts:
        if p.reference is None:
            continue
        conv = Conversation([*p.turns, Turn("assistant", [Part(type="text", text=p.reference)])])
        full = format_example(conv, loaded.formatter, loaded.family, [image_size(Path(i)) for i in conv.images],
                       loaded.processor)
        ids = encode(loaded, p).input_ids
        assert full.input_ids[:len(ids)] == ids  # exactly the training tokens ...
        assert full.labels[len(ids) - 1] == IGNORE_INDEX != full.labels[len(ids)]  # ... up to the last reply
        assert loaded.formatter.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_equals_one_by_one(family, data_file):
    """On the random base models, whose replies change with every input token (so padding mistakes show)."""
    loaded = load_for_inference(f"builtin:{BUILTIN_FOR[family]}")
    examples = [encode(loaded, p) for p in read_prompts(data_file, image_root=str(SHAPES))]
    assert len({len(e.input_ids) for e in examples}) > 2  # batches really are padded
    alone = [generate(loaded, [e], max_new_tokens=12)[0] for e in examples]
    assert generate(loaded, examples, max_new_tokens=12) == alone
    assert generate(loaded, examples[::-1][:3], max_new_tokens=12) == alone[::-1][:3]


@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_and_replies_equal_plain_transformers(family):
    """What transformers' own processor + generate() make of the same question (M-RoPE positions included)."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmtune.demo import builtin_model_path
    from vlmtune.inference import model_inputs, single_prompt

    image, question = SHAPES / "images" / "eval_0003.png", "Which shape is blue?"
    loaded = load_for_inference(f"builtin:{BUILTIN_FOR[family]}")
    ours = model_inputs(loaded, [encode(loaded, single_prompt([image], question))])
    path = builtin_model_path(BUILTIN_FOR[family])
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    theirs = processor(text=[text], images=[Image.open(image).convert("RGB")], return_tensors="pt")
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    with torch.no_grad():
        assert torch.allclose(model(**ours).logits, model(**theirs).logits, atol=1e-5)
    out = model.generate(**theirs, max_new_tokens=10, do_sample=False)
    reply = processor.decode(out[0, theirs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert generate(loaded, [encode(loaded, single_prompt([image], question))], max_new_tokens=10) == [reply]


def test_adapter_and_merged_model_predict_the_same(trained_adapter, merged, data_file, tmp_path):  # noqa: F811
    kw = dict(data=data_file, image_root=str(SHAPES), max_new_tokens=12, batch_size=3, progress=False)
    via_adapter = vlmtune.predict(trained_adapter("qwen2_vl"), out=tmp_path / "a.jsonl", **kw)
    via_merged = vlmtune.predict(merged, out=tmp_path / "m.jsonl", **kw)
    assert [r["prediction"] for r in via_adapter] == [r["prediction"] for r in via_merged]
    written = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    assert [w["row"] for w in written] == rows and [w["prediction"] for w in written] == [
        r["prediction"] for r in via_merged]
    assert written[0]["reference"] == rows[0]["messages"][-1]["content"][0]["text"] and written[5]["reference"] is None
    assert written[0]["source"].endswith("rows.jsonl:1")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_predicts_the_same_from_its_adapter_and_its_merge(family, trained_adapter, data_file,  # noqa: F811
                                                                       tmp_path):
    """The 2-step adapter of each family (test_merge.py) on batches of a multi-turn and a two-image row."""
    adapter = trained_adapter(family)
    merged = vlmtune.merge_adapter(adapter, tmp_path / "merged", check=False, **QUIET).output_dir
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(data_file.read_text().splitlines()[4:]) + "\n")
    kw = dict(data=rows, image_root=str(SHAPES), max_new_tokens=8, batch_size=2, progress=False)
    via_adapter = vlmtune.predict(adapter, **kw)
    via_merged = vlmtune.predict(merged, **kw)
    assert len(via_adapter) == 4 and [r["prediction"] for r in via_adapter] == [r["prediction"] for r in via_merged]
    assert all(isinstance(r["prediction"], str) for r in via_adapter)


def test_single_prompt_with_images(merged):
    image = SHAPES / "images" / "eval_0001.png"
    greedy = vlmtune.predict(merged, images=[image], prompt="What colour is the square?", max_new_tokens=8,
                             progress=False)
    assert len(greedy) == 1 and greedy[0]["reference"] is None
    assert greedy[0]["row"]["messages"][0]["content"][0] == {"type": "image", "image": str(image)}
    two = vlmtune.predict(merged, images=[image, SHAPES / "images" / "eval_0002.png"], prompt="Same colour?",
                          max_new_tokens=4, progress=False)
    assert isinstance(two[0]["prediction"], str)


def test_sampling_follows_temperature_top_p_and_seed(merged):
    """Each knob must change what is generated: the old test passed with temperature and top_p ignored."""
    loaded = load_for_inference(merged)
    kw = dict(images=[SHAPES / "images" / "eval_0001.png"], prompt="What colour is the square?", max_new_tokens=8,
              progress=False, loaded=loaded)
    greedy = vlmtune.predict(merged, **kw)[0]["prediction"]

    def sample(seed, temperature=1.5, top_p=1.0):
        return vlmtune.predict(merged, temperature=temperature, top_p=top_p, seed=seed, **kw)[0]["prediction"]

    hot = {seed: sample(seed) for seed in range(1, 6)}
    assert sample(1) == hot[1]  # the seed makes sampling reproducible
    differs = [seed for seed, text in hot.items() if text != greedy]
    assert differs, f"temperature 1.5 gave the greedy reply {greedy!r} for every seed: it did not sample"
    seed = differs[0]
    assert sample(seed, top_p=1e-3) == greedy  # a tiny nucleus keeps only the most likely token
    assert sample(seed, temperature=1e-3) == greedy  # the temperature's value counts, not only whether it is > 0


def test_cli_predict(merged, data_file, tmp_path, capsys):
    image = SHAPES / "images" / "eval_0001.png"
    assert main(["predict", str(merged), "--image", str(image), "--prompt", "What colour?",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() != ""
    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(merged), "--data", str(data_file), "--image-root", str(SHAPES), "--out", str(out),
                 "--max-new-tokens", "6", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"8 predictions written to {out}" in printed and "equal their reference answer" in printed
    assert len(out.read_text().splitlines()) == 8


@pytest.mark.parametrize("args, expected", [
    (["--prompt", "hi", "--image", "nope.png"], "image not found"),
    (["--data", "missing.jsonl"], "data file not found"),
    (["--prompt", "hi", "--data", "x.jsonl"], "either a prompt"),
    (["--data", "BAD", "--image-root", str(SHAPES)], "bad.jsonl:2: message 0: unknown role"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
])
def test_bad_predict_inputs_exit_cleanly(merged, tmp_path, capsys, args, expected):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "q"}]},
                                               {"messages": [{"role": "robot", "content": "q"}]}])
    args = [str(bad) if a == "BAD" else a for a in args]
    code = main(["predict", str(merged), *args])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err


def test_a_folder_that_is_no_model_is_refused(tmp_path, capsys):
    assert main(["predict", str(tmp_path), "--prompt", "hi"]) == 2
    assert "neither a model folder" in capsys.readouterr().err


def test_predict_reads_other_data_formats_as_training_does(tmp_path):
    import json as _json

    from PIL import Image

    Image.new("RGB", (56, 56), (200, 0, 0)).save(tmp_path / "red.png")
    path = tmp_path / "vqa.jsonl"
    path.write_text(_json.dumps({"img": "red.png", "q": "What colour?", "a": "Red."}) + "\n")
    (prompt,) = read_prompts(path, None, "vqa", {"columns": {"image": "img", "question": "q", "answer": "a"}})
    assert prompt.reference == "Red." and [t.role for t in prompt.turns] == ["user"]
    assert prompt.turns[0].images == [str(tmp_path / "red.png")]


def test_predict_defaults_to_the_data_format_the_adapter_was_trained_on(tmp_path):
    import json as _json

    from vlmtune.inference.prompts import data_settings

    (tmp_path / "vlmtune.json").write_text(_json.dumps(
        {"data": {"format": "caption", "columns": {"image": "pic"}, "caption_prompt": "Say what you see."}}))
    assert data_settings(tmp_path, None) == ("caption", {"columns": {"image": "pic"},
                                                           "caption_prompt": "Say what you see."})
    assert data_settings(tmp_path, "vqa")[0] == "vqa"
    assert data_settings(tmp_path / "nothing", None) == ("messages", {"columns": {}})


# ---------------------------------------------------------------- --out: checked first, written as it goes


@pytest.fixture
def model_never_loads(monkeypatch):
    import vlmtune.inference.run as prediction  # predict() as it calls them

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although --out cannot be written")

    monkeypatch.setattr(prediction, "load_for_inference", refuse)


@pytest.mark.parametrize("kind, expected", [("folder", "is a folder; give a file name"),
                                            ("under a file", "cannot write --out")])
def test_an_unwritable_out_is_refused_before_the_model_loads(data_file, tmp_path, capsys, model_never_loads,
                                                             kind, expected):
    if kind == "folder":  # issue 8: failed only after every prediction was made, and all were lost
        out = tmp_path / "preds"
        out.mkdir()
    else:
        (tmp_path / "file.txt").write_text("mine")
        out = tmp_path / "file.txt" / "preds.jsonl"
    code = main(["predict", "builtin:tiny-qwen2-vl", "--data", str(data_file), "--image-root", str(SHAPES),
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and str(out) in err and "Traceback" not in err
    assert kind == "folder" or (tmp_path / "file.txt").read_text() == "mine"
    assert not list(tmp_path.glob("**/*.partial"))


def test_predictions_are_written_as_they_come_and_kept_on_a_crash(merged, data_file, tmp_path, capsys,
                                                                  monkeypatch):
    import vlmtune.inference.run as prediction  # predict() as it calls them

    real, calls = prediction.generate, []

    def crash_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(prediction, "generate", crash_on_third_batch)
    out = tmp_path / "preds.jsonl"
    kw = dict(data=data_file, image_root=str(SHAPES), max_new_tokens=4, batch_size=3, progress=False, out=out)
    with pytest.raises(RuntimeError, match="out of memory"):
        vlmtune.predict(merged, **kw)
    partial = tmp_path / "preds.jsonl.partial"
    assert f"the 6 of 8 predictions made before this are in {partial}" in capsys.readouterr().err
    kept = [json.loads(line) for line in partial.read_text().splitlines()]
    assert len(kept) == 6 and all(set(r) == {"row", "prediction", "reference", "source"} for r in kept)
    assert not out.exists()
    monkeypatch.setattr(prediction, "generate", real)
    records = vlmtune.predict(merged, **kw)
    assert [json.loads(line) for line in out.read_text().splitlines()] == records and not partial.exists()
    by_source = {r["source"]: r["prediction"] for r in records}
    assert all(by_source[r["source"]] == r["prediction"] for r in kept)  # the kept ones are the real predictions


@pytest.mark.parametrize("fmt", ["sharegpt", "messages"])
def test_predict_keeps_a_rows_tools_as_training_does(fmt, tmp_path, processor_for):
    """A row's tool definitions reach the prompt (a template that renders them) or refuse it (one that does not)."""
    import copy

    from PIL import Image

    from vlmtune.data.formatting import Formatter
    from vlmtune.errors import VlmtuneError
    from vlmtune.inference import Loaded

    from .test_peer_layouts import TOOLS, TOOLS_TEMPLATE

    Image.new("RGB", (56, 56), (200, 0, 0)).save(tmp_path / "red.png")
    path = tmp_path / "rows.json"
    if fmt == "sharegpt":
        path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "<image>Colour?"},
                                                       {"from": "gpt", "value": "Red."}],
                                     "images": ["red.png"], "tools": json.dumps(TOOLS)}]))
    else:  # the default format, read by its own path
        path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": [
            {"role": "user", "content": [{"type": "image", "image": "red.png"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "Red."}], "tools": TOOLS}])
    (prompt,) = read_prompts(path, None, fmt, {})
    assert prompt.tools == TOOLS
    family = families.get("qwen2_vl")
    plain = processor_for("qwen2_vl")
    with pytest.raises(VlmtuneError, match='gives "tools"'):
        encode(Loaded(None, plain, family, Formatter(family, plain), "model"), prompt)
    processor = copy.copy(plain)
    processor.chat_template = TOOLS_TEMPLATE + plain.chat_template
    example = encode(Loaded(None, processor, family, Formatter(family, processor), "model"), prompt)
    assert '"name": "get_weather"' in processor.tokenizer.decode(example.input_ids)


def test_a_rerun_keeps_the_partial_predictions_of_earlier_runs(data_file, tmp_path, capsys, monkeypatch):
    """A rerun that fails before its first batch once wrote over <out>.partial and then deleted it."""
    import os

    import vlmtune.inference.run as prediction  # predict() as it calls them

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(prediction, "load_for_inference", crash)
    out, partial = tmp_path / "preds.jsonl", tmp_path / "preds.jsonl.partial"
    earlier = [json.dumps({"row": {}, "prediction": f"a circle {n}", "reference": None, "source": "x"}) + "\n"
               for n in (1, 2)]
    for text in earlier:  # two earlier crashed runs, their files written in the same second
        partial.write_text(text)
        os.utime(partial, (1_700_000_000, 1_700_000_000))
        with pytest.raises(RuntimeError, match="out of memory"):
            vlmtune.predict("builtin:tiny-qwen2-vl", data=data_file, image_root=str(SHAPES), out=out,
                            progress=False)
        assert f"the predictions an earlier run left in {partial} are kept in" in capsys.readouterr().err
    assert sorted(p.read_text() for p in tmp_path.glob("preds.jsonl.*.partial")) == earlier  # neither written over
    assert not partial.exists() and not out.exists()


def test_every_bad_image_of_another_format_is_reported_before_the_model_loads(tmp_path, capsys,
                                                                                model_never_loads):
    from PIL import Image

    Image.new("RGB", (56, 56), (200, 0, 0)).save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [{"image": "red.png", "question": "Colour?", "answer": "Red."},
            {"image": "missing.png", "question": "Colour?", "answer": "Red."},
            {"image": "broken.png", "question": "Colour?", "answer": "Red."}]
    data = write_jsonl(tmp_path / "vqa.jsonl", rows)
    code = main(["predict", "builtin:tiny-qwen2-vl", "--data", str(data), "--format", "vqa"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"2 row(s) of {data} cannot be used" in err
    assert f"{data}:2: image not found: {tmp_path / 'missing.png'}" in err
    assert f"{data}:3: image cannot be read: {tmp_path / 'broken.png'}" in err


def video_rows(tmp_path) -> Path:
    """A prompt-only messages row whose video is a list of four 90x60 frame images."""
    from PIL import Image

    names = []
    for k in range(4):
        Image.new("RGB", (90, 60), (60 * k, 0, 200 - 40 * k)).save(tmp_path / f"f{k}.png")
        names.append(f"f{k}.png")
    return write_jsonl(tmp_path / "rows.jsonl", [{"messages": [{"role": "user", "content": [
        {"type": "video", "video": names}, {"type": "text", "text": "What changes?"}]}]}])


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_a_video_prompt_is_predicted_with_the_families_video_inputs(family, tmp_path):
    """The planned clip reaches generate() as the family's video tensors, one per video token, and predict replies."""
    from vlmtune.inference import model_inputs

    data = video_rows(tmp_path)
    loaded = load_for_inference(f"builtin:{BUILTIN_FOR[family]}")
    (prompt,) = read_prompts(data)
    example = encode(loaded, prompt)
    assert [c.source for c in example.videos] == [tuple(str(tmp_path / f"f{k}.png") for k in range(4))]
    batch = model_inputs(loaded, [example])
    assert batch["video_grid_thw"].tolist() == [list(example.videos[0].grid)]
    video_id = loaded.processor.tokenizer.convert_tokens_to_ids(loaded.family.video_placeholder)
    merge = loaded.processor.video_processor.merge_size
    assert int((batch["input_ids"] == video_id).sum()) == batch["pixel_values_videos"].shape[0] // merge**2 > 0
    (record,) = vlmtune.predict(f"builtin:{BUILTIN_FOR[family]}", data=data, loaded=loaded, max_new_tokens=6,
                                progress=False)
    assert isinstance(record["prediction"], str) and record["source"] == f"{data}:1"


@pytest.mark.parametrize("fps", [2.0, 0.5])
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_inputs_and_replies_equal_plain_transformers(family, fps, tmp_path):
    """What transformers' own processor + generate() make of the same frames and question, at the recipe's fps
    (Qwen2.5-VL's video positions follow the seconds each frame covers)."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.video_utils import VideoMetadata

    from vlmtune.data.video import DEFAULT_MAX_FRAMES, apply_video_settings
    from vlmtune.demo import builtin_model_path
    from vlmtune.inference import model_inputs

    data = video_rows(tmp_path)
    loaded = load_for_inference(f"builtin:{BUILTIN_FOR[family]}")
    apply_video_settings(loaded.processor, loaded.family.pixels, fps, DEFAULT_MAX_FRAMES)  # as training saved it
    ours = model_inputs(loaded, [encode(loaded, read_prompts(data)[0])])
    path = builtin_model_path(BUILTIN_FOR[family])
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What changes?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    frames = [Image.open(tmp_path / f"f{k}.png").convert("RGB") for k in range(4)]
    metadata = VideoMetadata(total_num_frames=4, fps=fps, frames_indices=[0, 1, 2, 3])  # as sampled
    theirs = processor(text=[text], videos=[frames], video_metadata=[metadata], return_tensors="pt",
                       do_sample_frames=False,
                       cap_pixels_per_frame=bool(processor.video_processor.cap_pixels_per_frame))
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert ours["video_grid_thw"].tolist() == theirs["video_grid_thw"].tolist()
    assert torch.allclose(ours["pixel_values_videos"], theirs["pixel_values_videos"])
    with torch.no_grad():
        assert torch.allclose(model(**ours).logits, model(**theirs).logits, atol=1e-5)
    out = model.generate(**theirs, max_new_tokens=10, do_sample=False)
    reply = processor.decode(out[0, theirs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert generate(loaded, [encode(loaded, read_prompts(data)[0])], max_new_tokens=10) == [reply]


def test_a_video_prompt_to_a_family_without_video_is_its_row_problem(tmp_path, processor_for):
    from vlmtune.data.formatting import Formatter
    from vlmtune.errors import VlmtuneError
    from vlmtune.inference import Loaded

    data = video_rows(tmp_path)
    family, processor = families.get("llava"), processor_for("llava")
    assert not family.takes_video()
    with pytest.raises(VlmtuneError, match=rf"{data}:1: this model family \(llava\) does not take video; "
                                           "remove the video parts or use a family that does"):
        encode(Loaded(None, processor, family, Formatter(family, processor), "model"), read_prompts(data)[0])
