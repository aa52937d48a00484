"""eval: base vs adapter in one run (disable_adapter is the bare base), the table, the files, and every refusal
made before a model loads; the tiny demo's adapter beats its base on the shapes eval set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import vlmtune
from vlmtune.cli import main
from vlmtune.errors import VlmtuneError
from vlmtune.evaluation.rows import read_eval_rows
from vlmtune.metrics import known_metrics

from .conftest import write_jsonl
from .run_fixtures import SHAPES, recipe_at, write_train_data
from .test_merge import BUILTIN_FOR, FAMILIES

ROOT = Path(__file__).resolve().parents[1]
BASE = "builtin:tiny-qwen2-vl"
FAST = {"max_new_tokens": 8, "bootstrap": 200, "progress": False, "log": lambda *_: None}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """Ten steps on 8 shapes rows (enough to change the replies), with the base's own processor settings (so a
    separate eval of the base formats the prompts alike)."""
    folder = tmp_path_factory.mktemp("eval-adapter")
    out = folder / "adapter"
    fields = {"train.save_steps": 1000, "train.max_steps": 10, "train.learning_rate": 2e-2}
    vlmtune.train(recipe_at(out, write_train_data(folder), **fields), log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Six shapes eval rows and one prompt-only row (no reference: skipped)."""
    rows = [json.loads(line) for line in (SHAPES / "eval.jsonl").read_text().splitlines()[:6]]
    rows.insert(2, {"messages": [{"role": "user", "content": [{"type": "image", "image": "images/eval_0009.png"},
                                                              {"type": "text", "text": "How many shapes?"}]}]})
    return write_jsonl(tmp_path_factory.mktemp("eval-data") / "rows.jsonl", rows)


@pytest.fixture(scope="module")
def against_base(adapter, data_file):
    return vlmtune.evaluate(adapter, data_file, image_root=str(SHAPES), **FAST)


@pytest.fixture
def model_never_loads(monkeypatch):
    import vlmtune.evaluation.run as run

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the input is bad")

    monkeypatch.setattr(run, "load_for_inference", refuse)


def cli(*args) -> list[str]:
    return ["eval", *map(str, args), "--max-new-tokens", "8", "--bootstrap", "200"]


def test_eval_against_base_end_to_end(adapter, data_file, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(cli(adapter, "--data", data_file, "--image-root", SHAPES, "--out", out)) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [c.strip() for c in lines[0].split("|")] == ["metric", "base", "adapter", "Δ (95% CI)"]
    assert [line.split("|")[0].strip() for line in lines[2:4]] == ["exact_match", "token_f1"]  # auto for messages
    assert "rows that got better" in captured.out and "rows that got worse" in captured.out
    assert "skipped 1 row(s) without a reference answer" in captured.err and "rows.jsonl:3" in captured.err

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_read"] == 7 and summary["rows_scored"] == 6 and summary["rows_skipped_no_reference"] == 1
    assert summary["skipped"] == [f"{data_file}:3"]
    assert summary["seed"] == 0 and summary["compared"] == ["base", "adapter"]
    assert summary["systems"]["base"]["model"] == BASE and summary["systems"]["adapter"]["model"] == str(adapter)
    for name, row in zip(("exact_match", "token_f1"), lines[2:4], strict=True):
        v = summary["metrics"][name][name]
        assert v["delta"] == pytest.approx(v["adapter"] - v["base"])
        assert v["ci95"][0] <= v["delta"] <= v["ci95"][1]
        assert [c.strip() for c in row.split("|")][1:3] == [f"{v['base']:.3f}", f"{v['adapter']:.3f}"]

    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["system"] for r in records] == ["base"] * 6 + ["adapter"] * 6
    assert [r["source"] for r in records[:6]] == [f"{data_file}:{n}" for n in (1, 2, 4, 5, 6, 7)]
    first = records[6]
    assert first["references"] == ["The square is red."] and first["question"] == "What colour is the square?"
    assert first["images"] == [str(SHAPES / "images" / "eval_0001.png")] and first["model"] == str(adapter)
    assert set(first["scores"]) == {"exact_match", "token_f1"}
    mean_f1 = sum(r["scores"]["token_f1"] for r in records[6:]) / 6
    assert mean_f1 == pytest.approx(summary["metrics"]["token_f1"]["token_f1"]["adapter"])
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_the_base_column_is_a_separate_eval_of_the_base_model(against_base, data_file):
    alone = vlmtune.evaluate(BASE, data_file, image_root=str(SHAPES), **FAST)
    assert alone.systems == ("model",) and alone.summary["metrics"]["token_f1"]  # `none` is the default for a model
    base = [r["prediction"] for r in against_base.records if r["system"] == "base"]
    tuned = [r["prediction"] for r in against_base.records if r["system"] == "adapter"]
    assert base == [r["prediction"] for r in alone.records]
    assert base != tuned  # the adapter changes the replies, so equal base replies show the adapter was off
    for name, keys in alone.summary["metrics"].items():
        for key, value in keys.items():
            assert against_base.summary["metrics"][name][key]["base"] == pytest.approx(value)


def test_against_another_model_loads_it_and_names_the_columns(against_base, adapter, data_file):
    other = builtin_folder()
    result = vlmtune.evaluate(adapter, data_file, image_root=str(SHAPES), against=str(other), **FAST)
    assert result.systems == ("against", "adapter")
    assert result.render().splitlines()[0].replace(" ", "") == "metric|against|adapter|Δ(95%CI)"
    assert [r["prediction"] for r in result.records if r["system"] == "against"] == \
        [r["prediction"] for r in against_base.records if r["system"] == "base"]


def builtin_folder() -> Path:
    from vlmtune.demo import builtin_model_path

    return builtin_model_path("tiny-qwen2-vl")


def test_against_none_scores_the_adapter_alone(against_base, adapter, data_file, capsys):
    assert main(cli(adapter, "--data", data_file, "--image-root", SHAPES, "--against", "none", "--metric",
                    "token_f1")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].replace(" ", "") == "metric|adapter" and len(lines) == 3
    want = against_base.summary["metrics"]["token_f1"]["token_f1"]["adapter"]
    assert lines[2].split("|")[1].strip() == f"{want:.3f}"


# ---------------------------------------------------------------- refused before any model loads


def test_an_unknown_metric_lists_the_known_ones(adapter, data_file, capsys, model_never_loads):
    assert main(cli(adapter, "--data", data_file, "--metric", "exact_match", "--metric", "bleu_7")) == 2
    err = capsys.readouterr().err
    assert "'bleu_7'" in err and all(name in err for name in known_metrics())


def test_references_a_metric_cannot_score_are_named_with_their_rows(adapter, data_file, capsys, model_never_loads):
    assert main(cli(adapter, "--data", data_file, "--image-root", SHAPES, "--metric", "pope")) == 2
    err = capsys.readouterr().err
    assert "metric pope cannot score 6 reference(s)" in err and f"{data_file}:1: POPE needs a yes/no" in err


def test_the_out_folder_is_never_replaced_unless_named_again(adapter, data_file, tmp_path, capsys,
                                                              model_never_loads, monkeypatch):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    assert main(cli(adapter, "--data", data_file, "--out", theirs, "--overwrite")) == 2
    assert "holds files that eval did not write" in capsys.readouterr().err
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"] and (theirs / "notes.txt").read_text() == "mine"

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "summary.json").write_text(json.dumps({"vlmtune_eval": 1, "mark": "old"}))
    assert main(cli(adapter, "--data", data_file, "--out", earlier)) == 2
    err = capsys.readouterr().err
    assert "holds an earlier evaluation" in err and "--overwrite" in err
    assert json.loads((earlier / "summary.json").read_text())["mark"] == "old"

    monkeypatch.undo()  # with --overwrite the earlier eval's files are replaced
    assert main(cli(adapter, "--data", data_file, "--image-root", SHAPES, "--out", earlier, "--overwrite",
                    "--metric", "exact_match")) == 0
    assert "mark" not in json.loads((earlier / "summary.json").read_text())
    assert sorted(p.name for p in earlier.iterdir()) == ["predictions.jsonl", "summary.json"]


def test_against_base_needs_an_adapter(data_file, capsys, model_never_loads):
    assert main(cli(BASE, "--data", data_file, "--image-root", SHAPES, "--against", "base")) == 2
    assert "is a full model; use --against none" in capsys.readouterr().err


def test_a_model_of_another_family_is_named(adapter, data_file, capsys, model_never_loads):
    assert main(cli(adapter, "--data", data_file, "--image-root", SHAPES, "--against", "builtin:tiny-smolvlm")) == 2
    err = capsys.readouterr().err
    assert "qwen2_vl family" in err and "builtin:tiny-smolvlm is of the smolvlm family" in err


def test_a_missing_base_model_is_named(adapter, data_file, tmp_path, capsys, model_never_loads):
    copy = tmp_path / "moved"
    shutil.copytree(adapter, copy, ignore=shutil.ignore_patterns("checkpoints"))
    meta = json.loads((copy / "vlmtune.json").read_text())
    (copy / "vlmtune.json").write_text(json.dumps({**meta, "base_model": str(tmp_path / "gone")}))
    assert main(cli(copy, "--data", data_file, "--image-root", SHAPES)) == 2
    assert f"base model folder not found: {tmp_path / 'gone'}" in capsys.readouterr().err


def test_no_row_with_a_reference_is_an_error(adapter, tmp_path, model_never_loads):
    rows = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "Hi?"}]}])
    with pytest.raises(VlmtuneError, match=r"no row of .* has a reference answer to score against \(1 row\(s\) without one\)"):
        vlmtune.evaluate(adapter, rows, **FAST)


def test_vqa_rows_may_list_several_references(tmp_path):
    image = str(SHAPES / "images" / "eval_0001.png")
    rows = write_jsonl(tmp_path / "vqa.jsonl", [
        {"image": image, "question": "Colour?", "answer": "red"},
        {"image": image, "question": "Colour?", "answer": ["red", "dark red", "red"]},
        {"image": image, "question": "Colour?", "answer": [{"answer": "red", "answer_id": 1}, {"answer": "crimson"}]},
        {"image": image, "question": "Colour?", "answer": ""},
        {"image": image, "question": "Colour?", "ans": ["red"]}])
    got = read_eval_rows(rows, "vqa", {"columns": {}})
    assert [r.references for r in got.rows] == [("red",), ("red", "dark red", "red"), ("red", "crimson")]
    assert [r.question for r in got.rows] == ["Colour?"] * 3 and got.rows[0].prompt.images == [image]
    assert got.skipped == [f"{rows}:4", f"{rows}:5"]
    mapped = read_eval_rows(rows, "vqa", {"columns": {"answer": "ans"}})
    assert [r.references for r in mapped.rows] == [("red",)] and len(mapped.skipped) == 4
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"image": image, "question": "Colour?", "answer": [1, 2]}])
    with pytest.raises(VlmtuneError, match=r'bad.jsonl:1: "answer" must be a string or a list of strings'):
        read_eval_rows(bad, "vqa", {"columns": {}})


# ---------------------------------------------------------------- the check on the tiny demo


@pytest.mark.slow
def test_the_tiny_demo_adapter_beats_its_base_on_the_shapes_eval_set(tmp_path, capsys):
    """`vlmtune sft recipes/tiny-demo.yaml` (320 steps, ~1.5 min on 2 CPU cores), then eval on eval.jsonl."""
    out = tmp_path / "demo"
    vlmtune.train(vlmtune.load_recipe(ROOT / "recipes" / "tiny-demo.yaml", overrides={"output_dir": str(out)}),
                  log=lambda *_: None)
    capsys.readouterr()  # what training printed
    assert main(["eval", str(out), "--data", str(SHAPES / "eval.jsonl"), "--max-new-tokens", "24"]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.split("|")] for line in table[2:4])}
    better = [name for name, (_, base, tuned, _ci) in rows.items() if float(tuned) > float(base)]
    assert better, table[:4]
    low = [float(x) for x in rows["token_f1"][3].split("(")[1].rstrip(")").split(",")][0]
    assert low > 0  # the interval excludes no change


# ---------------------------------------------------------------- every family: the bare base is the base


# the language model's layers and its head (on the tiny Gemma 3 a change below the head leaves every greedy
# reply a newline, which strips to "")
TARGETS = r"(.*\.)?(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|lm_head)"


def random_adapter(family: str, folder: Path) -> Path:
    """A LoRA adapter with random (non-zero) weights on a family's tiny base, saved as PEFT saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor

    from vlmtune import families
    from vlmtune.demo import builtin_model_path

    base = builtin_model_path(BUILTIN_FOR[family])
    torch.manual_seed(0)
    model = families.get(family).load_class().from_pretrained(base)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=64, target_modules=TARGETS, init_lora_weights=False))
    peft.save_pretrained(folder, save_embedding_layers=False)
    AutoProcessor.from_pretrained(base).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_bare_base_equals_the_base_model(family, data_file, tmp_path):
    adapter = random_adapter(family, tmp_path / "adapter")
    two = vlmtune.evaluate(adapter, data_file, image_root=str(SHAPES), metrics="token_f1", **FAST)
    alone = vlmtune.evaluate(f"builtin:{BUILTIN_FOR[family]}", data_file, image_root=str(SHAPES),
                             metrics="token_f1", **FAST)
    assert two.summary["systems"]["adapter"]["family"] == family
    base = [r["prediction"] for r in two.records if r["system"] == "base"]
    assert base == [r["prediction"] for r in alone.records]
    assert base != [r["prediction"] for r in two.records if r["system"] == "adapter"]
