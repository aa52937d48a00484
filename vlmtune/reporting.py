"""Where a run's logs go: TensorBoard by default when it is installed, its event files inside the run's folder.

Each start of a run (a resume too) writes its own `logs/<UTC time>/`, so TensorBoard shows a resumed run beside
the attempt it continues instead of overlapping their steps in one file. `report_to: [wandb]` and the others
pass through to the Trainer unchanged.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

LOGS = "logs"  # <run folder>/logs/: a run's own entry (run_folder._RUN_ENTRIES), like checkpoints/


def default_report_to() -> list[str]:
    """["tensorboard"] when it is installed, else ["none"]."""
    return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else ["none"]


class LogsInRunFolder:
    """Trainer mixin: the TensorBoard callback writes under <run folder>/logs/<UTC time>/ (the Trainer's own
    default, checkpoints/runs/, would sit among the checkpoints)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from transformers.integrations import TensorBoardCallback

        run = Path(self.args.output_dir).parent  # output_dir is the run's checkpoints/ folder
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                callback.logging_dir = str(run / LOGS / time.strftime("%Y-%m-%dT%H-%M-%SZ", time.gmtime()))
