"""notebooks/quickstart.ipynb runs top to bottom offline on a CPU (executed with nbclient, as a user would)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs_without_errors():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell
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
