"""Training curves: every series the Trainer logged (train and eval loss, learning rate, grad norm, each eval
metric), one curve each, drawn from its log history with matplotlib.

A run folder keeps the whole history in log_history.json (a checkpoint's trainer_state.json holds it up to that
step), and training_curves.png beside it. Figures are built without pyplot: no global figure state, no GUI
backend; in a notebook `training_curves(run)` displays inline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

LOG_HISTORY = "log_history.json"
CURVES = "training_curves.png"
_STATE = "trainer_state.json"
# logged numbers that are not a series over training: bookkeeping and the end-of-run summary (train_*)
_NOT_SERIES = {"epoch", "step", "total_flos", "num_tokens", "eval_num_tokens", "num_input_tokens_seen"}
_NOT_SERIES_ENDINGS = ("_runtime", "_per_second")
_TITLES = {"loss": "loss", "learning_rate": "learning rate", "grad_norm": "grad norm"}


def series(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Logged name -> [(step, value)], in the order first logged; only finite numbers."""
    out: dict[str, list[tuple[int, float]]] = {}
    for entry in history:
        step = entry.get("step")
        for key, value in entry.items():
            if (key in _NOT_SERIES or key.startswith("train_") or key.endswith(_NOT_SERIES_ENDINGS)
                    or step is None or isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value)):
                continue
            out.setdefault(key, []).append((step, float(value)))
    return out


def panels(names: list[str]) -> list[tuple[str, list[str]]]:
    """(title, series) per panel: a series beside its eval_ twin (loss with eval_loss), each other alone."""
    out, placed = [], set()
    for name in names:
        if name in placed:
            continue
        base = name.removeprefix("eval_")
        group = [n for n in (base, f"eval_{base}") if n in names and n not in placed]
        placed.update(group)
        out.append((_TITLES.get(base, base.replace("_", " ")), group))
    return out


def figure(history: list[dict], title: str | None = None):
    """A matplotlib Figure: one panel per metric, one line per logged series (labelled by its logged name)."""
    from matplotlib.figure import Figure

    found = series(history)
    layout = panels(list(found))
    cols = min(3, max(len(layout), 1))
    rows = max(math.ceil(len(layout) / cols), 1)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
    # fixed margins: a layout engine measures every label again on each pass (it would double the drawing time)
    fig.subplots_adjust(left=0.5 / (4.2 * cols), right=0.98, bottom=0.5 / (3.0 * rows), top=1 - 0.75 / (3.0 * rows),
                        wspace=0.3, hspace=0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, group) in zip(axes, layout, strict=False):
        for key in group:
            steps, values = zip(*found[key], strict=True)
            ax.plot(steps, values, label=key, marker="o" if key.startswith("eval_") or len(steps) < 3 else None,
                    markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        if name == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(layout):]:
        ax.set_visible(False)
    if not layout:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "nothing logged", ha="center", va="center")
        axes[0].set_axis_off()
    if title:
        fig.suptitle(title)
    return fig


def write(history: list[dict], folder: Path, title: str | None = None) -> list[str]:
    """log_history.json and training_curves.png into `folder` (the final write's staging folder: it is moved
    into the run folder whole); the names written."""
    (folder / LOG_HISTORY).write_text(json.dumps(history, indent=1, default=str), encoding="utf-8")
    figure(history, title).savefig(folder / CURVES, dpi=100)
    return [LOG_HISTORY, CURVES]


def read_history(run) -> list[dict]:
    """The log history of a run folder (log_history.json) or a checkpoint folder (trainer_state.json)."""
    from .errors import VlmtuneError

    folder = Path(run).expanduser()
    for name, key in ((LOG_HISTORY, None), (_STATE, "log_history")):
        path = folder / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                return data if key is None else data[key]
            except (ValueError, KeyError, TypeError) as e:
                raise VlmtuneError(f"{path} cannot be read as a log history ({e}); it was cut short or edited") from None
    raise VlmtuneError(f"{folder} holds no log history ({LOG_HISTORY} of a finished run, or {_STATE} of a "
                       "checkpoint); give a run folder or one of its checkpoints/checkpoint-N folders")


def training_curves(run, title: str | None = None):
    """The curves of a run folder or checkpoint as a matplotlib Figure (shown inline in a notebook)."""
    return figure(read_history(run), title or str(Path(run).name))
