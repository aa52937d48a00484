"""`vlmtune sft` with faults injected at controlled points, for tests/test_checkpoints.py.

    python tests/outputs_worker.py [--kill-saving N] [--kill-publishing N] [--fill-disk-after-save BYTES]
                                   [--no-space-check] [--report FILE] -- sft recipe.yaml key=value ...

--kill-saving N: while checkpoint-N's optimizer state is being written, write half a file and SIGKILL this
  process (as `kill -9` or a power cut would).
--kill-publishing N: SIGKILL this process between the two renames that put a new checkpoint-N in place of an
  earlier one (the earlier one just parked as .saving/checkpoint-N.replaced).
--fill-disk-after-save BYTES: after the first checkpoint is saved, fill the disk of the output folder with a
  ballast file until only BYTES are free (the disk fills up during training).
--no-space-check: skip vlmtune's free-space check before a save, so the write itself meets the full disk.
--report FILE: after the command, write {"rc", "files": {path: size}} of the output folder to FILE (the tests
  run this inside a private tmpfs mount that is gone when the process ends).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path


def kill_while_saving(step: int) -> None:
    import torch

    original = torch.save

    def save(obj, f, *args, **kwargs):
        path = Path(str(f))
        if path.name == "optimizer.pt" and path.parent.name == f"checkpoint-{step}":
            path.write_bytes(b"PK\x03\x04" + b"\0" * 1000)  # the start of a zip file, then nothing
            os.kill(os.getpid(), signal.SIGKILL)
        return original(obj, f, *args, **kwargs)

    torch.save = save


def kill_while_publishing(step: int) -> None:
    original = os.replace

    def replace(src, dst, *args, **kwargs):
        original(src, dst, *args, **kwargs)
        if Path(dst).name == f"checkpoint-{step}.replaced":
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace


def fill_disk_after_first_save(leave: int) -> None:
    from transformers import TrainerCallback

    from vlmtune import training

    class Fill(TrainerCallback):
        done = False

        def on_save(self, args, state, control, **kwargs):
            if self.done:
                return
            self.done = True
            ballast = Path(args.output_dir).parent / "ballast.bin"
            with open(ballast, "wb") as f:
                while os.statvfs(ballast).f_bavail * os.statvfs(ballast).f_frsize > leave:
                    f.write(b"\0" * 4096)
                    f.flush()

    original = training.build_trainer

    def build(*args, **kwargs):
        trainer, report = original(*args, **kwargs)
        trainer.add_callback(Fill())
        return trainer, report

    training.build_trainer = build


def report(path: Path, rc: int, recipe_args: list[str]) -> None:
    out = next(Path(a.split("=", 1)[1]) for a in recipe_args if a.startswith("output_dir="))
    files = {str(p.relative_to(out)): p.stat().st_size for p in out.rglob("*") if p.is_file()} if out.is_dir() else {}
    path.write_text(json.dumps({"rc": rc, "files": files}))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-saving", type=int)
    parser.add_argument("--kill-publishing", type=int)
    parser.add_argument("--fill-disk-after-save", type=int)
    parser.add_argument("--no-space-check", action="store_true")
    parser.add_argument("--report", type=Path)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    opts = parser.parse_args()
    command = opts.command[1:] if opts.command[:1] == ["--"] else opts.command
    if opts.kill_saving is not None:
        kill_while_saving(opts.kill_saving)
    if opts.kill_publishing is not None:
        kill_while_publishing(opts.kill_publishing)
    if opts.fill_disk_after_save is not None:
        fill_disk_after_first_save(opts.fill_disk_after_save)
    if opts.no_space_check:
        from vlmtune import checkpoints

        checkpoints.shortage = lambda *args, **kwargs: None
    from vlmtune import cli

    rc = cli.main(command)
    if opts.report:
        report(opts.report, rc, command)
    return rc


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
