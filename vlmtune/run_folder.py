"""A run's output folder: whether a new run may write there, where it writes, and replacing an old run whole."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .config import Recipe
from .disk import existing_ancestor, swap_in
from .errors import VlmtuneError
from .reporting import LOGS
from .run_metadata import METADATA_FILE, listed_files, read_metadata, remove_metadata, write_metadata

RESULTS_FILE = "train_results.json"
RECIPE_FILE = "recipe.yaml"
CHECKPOINTS = "checkpoints"
STAGING_PREFIX = ".staging-"  # the final write's temporary folder (training.write_outputs)
MOVING_FILE = ".vlmtune-moving.json"  # the names the final write moves in, until vlmtune.json lists them
_RUN_ENTRIES = {METADATA_FILE, RESULTS_FILE, RECIPE_FILE, CHECKPOINTS, MOVING_FILE, LOGS}
OVERWRITE_HINT = "--overwrite (vlmtune.train(..., overwrite=True))"


@dataclass
class RunFolder:
    """Where a run ends up (`final`) and where it is written (`work`): the same folder, or a hidden sibling
    while an earlier run is being replaced (the earlier run stays whole until the new one is complete)."""

    final: Path
    work: Path

    @property
    def checkpoints(self) -> Path:
        return self.work / CHECKPOINTS

    @property
    def replacing(self) -> bool:
        return self.work != self.final

    def create(self) -> None:
        """Make the folder the run writes to (after every check passed: a refused run leaves nothing)."""
        self.work.mkdir(parents=True, exist_ok=True)

    def finish(self, log=print) -> None:
        """Put a complete replacement in place of the earlier run: two renames, no copy."""
        if not self.replacing:
            return
        swap_in(self.work, self.final, _aside(self.final))  # a kill between them: _complete_interrupted_swap
        log(f"replaced the earlier run in {self.final}")


def output_path(recipe: Recipe) -> Path:
    return Path(recipe.output_dir).expanduser().absolute()


def run_state(folder: Path) -> str:
    """new | empty (hidden names at most, and an empty checkpoints/) | finished | interrupted (a run's files
    without vlmtune.json) | foreign (someone else's files)."""
    if not folder.is_dir():
        return "new"
    names = {p.name for p in folder.iterdir()}
    if (folder / CHECKPOINTS).is_dir() and not any((folder / CHECKPOINTS).iterdir()):
        names.discard(CHECKPOINTS)  # the Trainer makes it as it starts: a crash before the first save left nothing
    if CHECKPOINTS not in names:
        names.discard(LOGS)  # the logs of a start that saved nothing: a new run adds its own logs/<time>/ beside
    if METADATA_FILE in names:
        return "finished"
    if names & _RUN_ENTRIES or any(n.startswith(STAGING_PREFIX) for n in names):
        return "interrupted"
    return "foreign" if any(not n.startswith(".") for n in names) else "empty"


def prepare(recipe: Recipe, overwrite: bool = False, log=print) -> RunFolder:
    """Check that the run may write to output_dir, before any work; where it writes (RunFolder.create makes it).

    A finished or interrupted run there is refused unless resumed or `overwrite`; with `overwrite` the new run
    is written beside it and swapped in when complete. It may move and delete files: only the main process calls
    it (checkpoints.folder_and_resume)."""
    out = output_path(recipe)
    _check_place(out, recipe)
    _complete_interrupted_swap(out, log)
    state = run_state(out)
    resume = recipe.train.resume_from_checkpoint is not None
    if state == "foreign":
        shown = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        raise VlmtuneError(f"output_dir {out} is not empty and holds no vlmtune run ({', '.join(shown[:5])}"
                           f"{', ...' if len(shown) > 5 else ''}); choose a new or empty folder (--overwrite "
                           "replaces only a folder that holds a vlmtune run)")
    if state in ("finished", "interrupted") and overwrite:
        others = _not_the_runs(out, state)
        if others:
            raise VlmtuneError(f"output_dir {out} holds files its run did not write ({', '.join(others[:5])}"
                               f"{', ...' if len(others) > 5 else ''}), which {OVERWRITE_HINT} would delete with "
                               "the run; move them out first, or choose another output_dir")
        return RunFolder(out, _replacement(out, resume, log))
    if state in ("finished", "interrupted") and not resume:
        raise VlmtuneError(_refusal(out, state))
    return RunFolder(out, out)


def _not_the_runs(out: Path, state: str) -> list[str]:
    """Names in a run's folder that the run did not write (a user's predictions, notes, ...).

    A finished run lists its files in vlmtune.json (one written before that list existed is taken as whole); a
    run killed during its final write, in .vlmtune-moving.json (note_moving)."""
    own = set(_RUN_ENTRIES)
    if state == "finished":
        try:
            parsed = read_metadata(out)
        except VlmtuneError:  # no list to trust: deleting anything could delete a user's file
            raise VlmtuneError(f"{out / METADATA_FILE} cannot be read, so {OVERWRITE_HINT} cannot tell the run's "
                               "files from anyone else's; choose another output_dir, or move what you want to keep "
                               f"out of {out} and delete it yourself") from None
        if parsed.get("files") is None:
            return []
        own.update(parsed["files"])
    else:
        own.update(_listed(out / MOVING_FILE, "files") or [])
    return sorted(p.name for p in out.iterdir() if p.name not in own and not p.name.startswith("."))


def _listed(path: Path, key: str) -> list[str] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, list) else None


def note_moving(out: Path, names: list[str]) -> None:
    """Before the final write moves its files into `out`: their names (and those an earlier write there listed),
    so that --overwrite after a kill mid-move knows them as the run's own. vlmtune.json lists them after."""
    listed = sorted(set(names).union(listed_files(out) or [], _listed(out / MOVING_FILE, "files") or []))
    tmp = out / f"{MOVING_FILE}.tmp"
    tmp.write_text(json.dumps({"files": listed}), encoding="utf-8")
    os.replace(tmp, out / MOVING_FILE)


def done_moving(out: Path) -> None:
    (out / MOVING_FILE).unlink(missing_ok=True)


def move_in(out: Path, staging: Path, meta: dict, also_listed=()) -> None:
    """The final write: every file staged in `staging` moved into `out` whole (replacing those of the same name),
    then vlmtune.json (`meta`, its "files" the names moved plus `also_listed`) last; a kill mid-move leaves the
    names known as the run's own (note_moving) and no vlmtune.json until the folder is whole again."""
    names = sorted(p.name for p in staging.iterdir())
    note_moving(out, names)
    remove_metadata(out)  # the folder is incomplete until it is written again
    for name in names:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    write_metadata(out, {**meta, "files": sorted({*names, *also_listed})})
    done_moving(out)


def _refusal(out: Path, state: str) -> str:
    if state == "finished":
        return (f"output_dir {out} already holds a finished run ({_finished_summary(out)}), which this run would "
                f"replace. Choose another output_dir to keep it; add {OVERWRITE_HINT} to replace it (it stays whole "
                "until the new run is complete); or continue it with train.resume_from_checkpoint=latest and a "
                "larger train.max_steps")
    found = sorted(p.name for p in (out / CHECKPOINTS).glob("checkpoint-*")) if (out / CHECKPOINTS).is_dir() else []
    if not found:
        return (f"output_dir {out} holds a run that did not finish and saved no checkpoint (no {METADATA_FILE}); "
                f"replace it with {OVERWRITE_HINT}, or choose another output_dir")
    return (f"output_dir {out} holds a run that did not finish (checkpoints {', '.join(found)}; no {METADATA_FILE}). "
            f"Continue it with train.resume_from_checkpoint=latest, replace it with {OVERWRITE_HINT}, or choose "
            "another output_dir")


def _finished_summary(out: Path) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime((out / METADATA_FILE).stat().st_mtime))
    try:
        steps = json.loads((out / RESULTS_FILE).read_text(encoding="utf-8")).get("global_step")
    except (OSError, ValueError):
        steps = None
    return f"written {when}" + (f", {steps} steps" if steps is not None else "")


def _replacement(out: Path, resume: bool, log) -> Path:
    """The hidden sibling the replacing run is written to; with resume, the one an earlier --overwrite left."""
    if os.path.ismount(out):
        raise VlmtuneError(f"output_dir {out} is a mount point: {OVERWRITE_HINT} replaces the folder by renaming "
                           "it, which a mount point cannot be; choose a folder inside it as output_dir")
    work = _staging(out)
    if resume:
        if not (work / CHECKPOINTS).is_dir():
            raise VlmtuneError(f"train.resume_from_checkpoint with --overwrite continues an unfinished replacement "
                               f"run, and there is none ({work} holds no checkpoints). Drop --overwrite to continue "
                               f"the run in {out}, or drop resume_from_checkpoint to replace it from scratch")
        log(f"continuing the unfinished replacement of {out} in {work}")
        return work
    if work.exists():
        shutil.rmtree(work)
        log(f"removed {work}: an unfinished replacement run left by an earlier --overwrite")
    log(f"--overwrite: the new run is written to {work}; it replaces {out} when it is complete")
    return work


def _staging(out: Path) -> Path:
    return out.parent / f".{out.name}.vlmtune-new"


def _aside(out: Path) -> Path:
    return out.parent / f".{out.name}.vlmtune-old"


def _complete_interrupted_swap(out: Path, log) -> None:
    """A kill between RunFolder.finish's two renames leaves the earlier run aside: finish the swap."""
    aside, staging = _aside(out), _staging(out)
    if not aside.exists():
        return
    if not out.exists():
        complete = (staging / METADATA_FILE).is_file()
        os.replace(staging if complete else aside, out)
        log(f"completed an interrupted replacement of {out}" if complete else f"restored the earlier run in {out}")
    shutil.rmtree(aside, ignore_errors=True)


def _check_place(out: Path, recipe: Recipe) -> None:
    """A folder (not a file), writable, and apart from the base model."""
    if out.exists() and not out.is_dir():
        raise VlmtuneError(f"output_dir {out} is a file, not a folder; give a new or empty folder")
    probe = existing_ancestor(out)
    if not probe.is_dir():
        raise VlmtuneError(f"output_dir {out} cannot be created: {probe} is a file; give a folder path")
    try:
        fd, name = tempfile.mkstemp(prefix=".vlmtune-write-check-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise VlmtuneError(f"output_dir {out}: cannot write in {probe} ({e.strerror or e}); choose a folder on a "
                           "writable disk (not a read-only mount) that you have permission to write to") from None
    from .modeling import BUILTIN_PREFIX

    base = Path(recipe.model.name_or_path).expanduser()
    if recipe.model.name_or_path.startswith(BUILTIN_PREFIX) or not base.is_dir():
        return  # a built-in tiny model or a hub id: its files live in a cache
    base, where = base.resolve(), out.resolve()
    relation = ("is" if where == base else "lies inside" if base in where.parents
                else "contains" if where in base.parents else None)
    if relation:
        raise VlmtuneError(f"output_dir {out} {relation} the base model folder {base}; a run must not write into "
                           "(or replace) the model it trains: choose a folder outside it")
