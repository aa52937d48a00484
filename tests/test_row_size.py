"""data.max_row_bytes: a row larger than the limit is a problem at its row, found before it is parsed or tokenized."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmtune.data.formats import RowProblem, read_rows
from vlmtune.data.readers import sources

from .conftest import write_jsonl
from .test_cli import GOOD_ROW, recipe, run, workspace  # noqa: F401 - the CLI tests' fixture


@pytest.fixture
def folder(request):
    """The CLI tests' workspace: the shapes images and a train.jsonl of four good rows."""
    return request.getfixturevalue("workspace")

LIMIT = 1000


def vqa(answer: str = "A square.") -> dict:
    return {"image": "img.png", "question": "What is it?", "answer": answer}


def outcome(path) -> list[str]:
    """Per row: "ok", or its problem message."""
    return [item.message if isinstance(item, RowProblem) else "ok"
            for item in read_rows(path, "vqa", max_row_bytes=LIMIT)]


def test_a_long_jsonl_line_is_a_problem_at_its_line_and_the_others_read_on(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [vqa(), vqa("x" * 5000), vqa(), vqa("é" * 600)])
    results = outcome(path)
    assert results[0] == results[2] == "ok"
    size = len(json.dumps(vqa("x" * 5000)))
    assert results[1] == (f"line is {size:,} bytes, over data.max_row_bytes={LIMIT:,}; shorten it (e.g. refer to "
                          "images by path rather than embedding them) or raise data.max_row_bytes")
    assert "over data.max_row_bytes" in results[3]  # 600 characters, but 1,200+ bytes
    assert [p.row for p in read_rows(path, "vqa", max_row_bytes=LIMIT) if isinstance(p, RowProblem)] == [2, 4]


def test_a_long_line_is_never_held_whole():
    class Recording(io.BytesIO):
        most = 0

        def readline(self, size=-1):
            line = super().readline(size)
            Recording.most = max(Recording.most, len(line))
            return line

    f = Recording(b'{"a": 1}\n' + b'{"a": "' + b"y" * 50 * LIMIT + b'"}\n{"a": 3}')
    got = [(n, line, size) for n, line, size in sources._lines(f, LIMIT)]
    assert [(n, line) for n, line, _ in got] == [(1, b'{"a": 1}\n'), (2, None), (3, b'{"a": 3}')]
    assert got[1][2] == 50 * LIMIT + 9 and Recording.most <= LIMIT + 1


def test_a_line_at_the_limit_is_fine(tmp_path):
    row = vqa("")
    row["answer"] = "z" * (LIMIT - len(json.dumps(row)))
    assert len(json.dumps(row)) == LIMIT
    assert outcome(write_jsonl(tmp_path / "a.jsonl", [row])) == ["ok"]


def test_a_long_json_array_item_is_a_problem_at_its_item(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([vqa(), vqa("x" * 5000), vqa()], indent=1))
    results = outcome(path)
    assert results[0] == results[2] == "ok" and results[1].startswith("item 2: item is ")
    assert "over data.max_row_bytes=1,000" in results[1]


def test_a_large_table_row_is_a_problem_at_its_row(tmp_path):
    path = tmp_path / "a.parquet"
    rows = [vqa(), vqa("x" * 5000), vqa()]
    pq.write_table(pa.table({key: [r[key] for r in rows] for key in rows[0]}), path)
    results = outcome(path)
    assert results[0] == results[2] == "ok" and results[1].startswith("row 2: row is ")
    assert "over data.max_row_bytes=1,000" in results[1]


def test_the_recipe_limit_is_used_by_validate(folder, capsys):
    long = json.loads(json.dumps(GOOD_ROW))
    long["messages"][1]["content"][0]["text"] = "word " * 2000
    write_jsonl(folder / "train.jsonl", [GOOD_ROW, long, GOOD_ROW])
    code, out, _ = run(capsys, "validate", recipe(folder))
    assert code == 0  # the default limit is 16 MiB
    code, out, _ = run(capsys, "validate", recipe(folder, data__max_row_bytes=5000))
    assert code == 2 and "train.jsonl:2: line is " in out and "over data.max_row_bytes=5,000" in out


@pytest.mark.parametrize("long_item", ['{"image": "img.png", "answer": "%s"}' % ("x" * 5000),
                                       "[" * 100_000 + "]" * 100_000])  # deeper than the JSON decoder can go
def test_a_long_json_array_item_is_never_decoded(tmp_path, monkeypatch, long_item):
    short = json.dumps(vqa())
    path = tmp_path / "a.json"
    path.write_text(f"[{short},\n {long_item},\n {short}]")
    spans = []
    real = json.JSONDecoder.raw_decode

    def recording(self, s, idx=0):
        value, end = real(self, s, idx)
        spans.append(end - idx)
        return value, end

    monkeypatch.setattr(json.JSONDecoder, "raw_decode", recording)
    results = outcome(path)
    assert results[0] == results[2] == "ok" and results[1].startswith(f"item 2: item is {len(long_item):,} bytes")
    assert spans and max(spans) == len(short)
