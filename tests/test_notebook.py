"""notebooks/quickstart.ipynb and multimodal_rag.ipynb run top to bottom offline on a CPU (executed with nbclient,
as a user would), and their outputs show what they are for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
RAG_NOTEBOOK = ROOT / "notebooks" / "multimodal_rag.ipynb"


def executed(path: Path):
    """The notebook at `path`, run top to bottom in its folder (CellExecutionError on the first failing cell)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


@pytest.mark.slow
def test_quickstart_notebook_runs_without_errors():
    nb = executed(NOTEBOOK)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "parity check: 2 probe inputs with an image" in text
    assert "A (merged model, plain transformers):" in text
    header = ["metric", "base", "adapter", "Δ (95% CI)"]  # the base-vs-adapter table
    assert any([c.strip() for c in line.split("|")] == header for line in text.splitlines())
    assert "best checkpoint: {'step': " in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1  # the training curves, inline
    unrun = [k for k, c in enumerate(nb.cells) if c.cell_type == "code" and c.execution_count is None]
    assert unrun == [], f"code cells that did not run: {unrun}"


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")


@pytest.mark.slow
def test_multimodal_rag_notebook_runs_and_retrieval_improves():
    """Tuning raises retrieval through the index; the answer was given the tuned index's top images."""
    nb = executed(RAG_NOTEBOOK)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [k for k, c in enumerate(code) if c.execution_count is None] == []

    outputs = [_text(c) for c in code]
    table = next(t for t in outputs if t.startswith("metric"))  # contrastive_recall: base, adapter, delta
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in table.splitlines()[1:]}
    assert rows["t2i_r@1"][1] > rows["t2i_r@1"][0] and rows["i2t_r@1"][1] > rows["i2t_r@1"][0]

    index_table = next(t for t in outputs if "index recall" in t).split("index recall")[1]  # through each index
    through = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in index_table.splitlines()[1:]}
    assert through["tuned"][0] > through["base"][0]  # recall@1
    assert all(t >= b for t, b in zip(through["tuned"], through["base"], strict=True))
    assert through["tuned"][0] == pytest.approx(rows["t2i_r@1"][1], abs=1e-3)  # the index agrees with the eval

    search = next(t for t in outputs if t.startswith("base\n"))
    tuned_top = re.findall(r"^  \d\.\d{4}  (\S+)$", search.split("tuned\n")[1], flags=re.M)
    answer = next(t for t in outputs if t.startswith("answer:"))
    given = re.findall(r"^  \d\. \d\.\d{4}  (\S+)$", answer, flags=re.M)
    assert len(tuned_top) == 3 and given == tuned_top  # the VLM got the tuned index's top 3, best first
    assert all(Path(p).is_file() and "/pairs/images/eval_" in p for p in given)
    assert answer.count("[image: ") == 3  # and its prompt holds three images
