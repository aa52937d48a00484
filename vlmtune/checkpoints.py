"""Checkpoints that are complete or absent, `latest` as the newest complete one, and resume checks.

Each checkpoint-N is written under checkpoints/.saving/ and renamed into place once whole, so a kill or a full
disk mid-save leaves the previous checkpoints as they were (a kill while a new copy replaces an earlier one of the
same step leaves both, and the next resume finishes the swap). Each holds the run's identity (vlmtune_resume.json):
a resume by a recipe that differs in a field that changes the training is refused, naming each difference."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

from . import best_checkpoint, run_folder
from .config import Recipe
from .disk import DiskFullError, folder_bytes, full_disk_as_error, shortage, swap_in
from .errors import VlmtuneError
from .main_decides import decided_by_main
from .run_folder import RECIPE_FILE, RunFolder
from .run_metadata import METADATA_FILE

STAGING = ".saving"
RESUME_FILE = "vlmtune_resume.json"
STATE_FILE = "trainer_state.json"  # the Trainer writes it last: a checkpoint without it was cut short
REPLACED = ".replaced"  # .saving/checkpoint-N.replaced: the copy a publish replaces, until the new one is in place
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# recipe fields a resumed run may change: they do not change what is trained or how
MAY_DIFFER = {"output_dir", "train.resume_from_checkpoint", "train.max_steps", "train.num_train_epochs",
              "train.logging_steps", "train.save_steps", "train.save_total_limit", "train.eval_steps",
              "train.per_device_eval_batch_size", "train.report_to", "train.max_nonfinite_steps", "data.eval",
              "data.num_workers", "data.check_images", "data.max_bad_samples", "data.max_row_bytes",
              "data.prefetch_factor", "train.gradient_checkpointing",  # recomputed activations are the same
              "train.liger_kernel",  # the same functions in fused kernels
              "train.eval_metrics", "train.eval_generate_samples", "train.eval_max_new_tokens"}  # only measure
_PATH_FIELDS = {"model.name_or_path", "data.train", "data.image_root"}


def is_complete(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file()


def _numbered(checkpoints: Path) -> list[tuple[int, Path]]:
    if not checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def newest_complete(checkpoints: Path) -> Path | None:
    complete = [p for _, p in _numbered(checkpoints) if is_complete(p)]
    return complete[-1] if complete else None


def incomplete(checkpoints: Path) -> list[Path]:
    """Checkpoint folders whose save was cut short: staged ones, and in-place ones without trainer_state.json."""
    staged = sorted((checkpoints / STAGING).iterdir()) if (checkpoints / STAGING).is_dir() else []
    return staged + [p for _, p in _numbered(checkpoints) if not is_complete(p)]


def folder_and_resume(recipe: Recipe, overwrite: bool = False, log=print) -> tuple[RunFolder, str | None]:
    """Where the run writes and the checkpoint it resumes from (run_folder.prepare, resume_point), decided by the
    main process alone, which may move and delete files meanwhile, and received by every other process."""
    def decide():
        folder = run_folder.prepare(recipe, overwrite=overwrite, log=log)
        return folder, resume_point(recipe, folder, log)

    return decided_by_main(decide, cuda=not recipe.train.use_cpu)


def resume_point(recipe: Recipe, folder: RunFolder, log=print) -> str | None:
    """The checkpoint folder to resume from (None: start fresh). `latest` is the newest complete checkpoint;
    a publish a kill cut short is finished, incomplete checkpoints are named, and staged leftovers of killed saves
    removed (only the main process calls this)."""
    wanted = recipe.train.resume_from_checkpoint
    if wanted is None:
        return None
    checkpoints = folder.checkpoints
    finish_publish(checkpoints, log)
    if wanted != "latest":
        path = Path(wanted).expanduser()
        if not path.is_dir():
            raise VlmtuneError(f"train.resume_from_checkpoint: folder not found: {wanted}")
        if not is_complete(path):
            raise VlmtuneError(f"train.resume_from_checkpoint: {wanted} is not a complete checkpoint (no {STATE_FILE}: "
                               "its save was cut short); give an earlier checkpoint, or latest")
        return str(path)
    partial = incomplete(checkpoints)
    last = newest_complete(checkpoints)
    if partial:
        log(f"ignoring incomplete checkpoint{'s' if len(partial) > 1 else ''} (a save was cut short): "
            + ", ".join(str(p) for p in partial))
        for p in partial:
            if p.parent.name == STAGING:
                shutil.rmtree(p, ignore_errors=True)
    with contextlib.suppress(OSError):
        (checkpoints / STAGING).rmdir()  # once empty: nothing is being saved
    if last is None:
        ignored = f" (only incomplete ones: {', '.join(p.name for p in partial)})" if partial else ""
        raise VlmtuneError(f"train.resume_from_checkpoint=latest: no checkpoint-N folder in {checkpoints}{ignored}; "
                           "remove the option to start fresh (in a new output_dir, or with --overwrite)")
    log(f"resuming from {last}")
    return str(last)


def run_identity(plan) -> dict:
    """What a checkpoint records about the run that made it: the recipe, the processes, the data it read."""
    from .distributed import world_size
    from .methods import get as method_for

    method = method_for(plan.recipe.method)
    return {"recipe": plan.recipe.to_dict(), "world_size": world_size(),
            "train_data": {"examples": method.size(plan.train), "tokens": method.num_tokens(plan.train)}}


def check_same_run(checkpoint: str, plan) -> None:
    """Refuse to resume `checkpoint` with a recipe or data that differ from its own in what changes the training."""
    saved = _saved_identity(Path(checkpoint))
    if saved is None:
        return
    now = run_identity(plan)
    differences = [f"{key}: {old!r} -> {new!r}" for key, old, new in recipe_differences(saved["recipe"], now["recipe"])]
    if "world_size" in saved and saved["world_size"] != now["world_size"]:
        differences.append(f"processes (world size, part of the batch size): {saved['world_size']} -> "
                           f"{now['world_size']}")
    old_data, new_data = saved.get("train_data"), now["train_data"]
    if old_data and old_data != new_data:
        differences.append(f"data.train content: {old_data['examples']} examples, {old_data['tokens']} tokens -> "
                           f"{new_data['examples']} examples, {new_data['tokens']} tokens")
    if differences:
        shown = "\n".join(f"  - {d}" for d in differences)
        raise VlmtuneError(f"train.resume_from_checkpoint: {checkpoint} was made by another run; resuming would "
                           f"continue it with a different training:\n{shown}\nPut those back to resume it, or start "
                           "a new run (another output_dir, or --overwrite)")


def _saved_identity(checkpoint: Path) -> dict | None:
    path = checkpoint / RESUME_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    recipe = checkpoint.parent.parent / RECIPE_FILE  # a finished run of an earlier version: its resolved recipe
    if recipe.is_file():
        import yaml

        return {"recipe": yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}}
    return None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and key != "columns":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recipe_differences(old: dict, new: dict) -> list[tuple[str, object, object]]:
    old, new = _flatten(old), _flatten(new)
    found = []
    for key in sorted(old.keys() & new.keys()):
        if key in MAY_DIFFER or (key.startswith("distributed.") and key != "distributed.deepspeed"):
            continue
        a, b = old[key], new[key]
        if key in _PATH_FIELDS and isinstance(a, str) and isinstance(b, str):
            a, b = (os.path.realpath(os.path.expanduser(v)) if v else v for v in (a, b))
        if a != b:
            found.append((key, old[key], new[key]))
    return found


def adapter_bytes(model) -> int:
    """Bytes of the trainable weights (whole parameters under ZeRO-3)."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters() if p.requires_grad)


def expected_checkpoint_bytes(model, deepspeed: bool, previous: Path | None) -> int:
    """About how much a checkpoint takes: the size of the previous one, or the weights plus Adam's two fp32
    moments (DeepSpeed also keeps fp32 master weights and its own copy of the weights) and 1 MiB of state."""
    weights = adapter_bytes(model)
    count = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    estimate = weights * (2 if deepspeed else 1) + count * (12 if deepspeed else 8) + 2**20
    return max(estimate, folder_bytes(previous)) if previous is not None else estimate


def publish(staged: Path, final: Path) -> None:
    """Rename a complete checkpoint into place (replacing one of the same step saved by an earlier attempt, which
    is parked as .saving/checkpoint-N.replaced meanwhile: see finish_publish)."""
    swap_in(staged, final, staged.parent / f"{final.name}{REPLACED}")


def finish_publish(checkpoints: Path, log=print) -> None:
    """Finish a publish a kill cut short between its two renames: checkpoint-N missing, the whole new copy still
    at .saving/checkpoint-N (a publish starts only once every rank has saved) and the old at its .replaced name."""
    staging = checkpoints / STAGING
    if not staging.is_dir():
        return
    for parked in sorted(staging.glob(f"checkpoint-*{REPLACED}")):
        final = checkpoints / parked.name.removesuffix(REPLACED)
        staged = staging / final.name
        if not final.exists():
            os.replace(staged if staged.is_dir() else parked, final)
            log(f"completed the interrupted save of {final}")
        shutil.rmtree(parked, ignore_errors=True)


def _discard(staged: Path) -> None:
    """Remove a staged checkpoint, and the staging folder once empty (nothing is being saved)."""
    shutil.rmtree(staged, ignore_errors=True)
    with contextlib.suppress(OSError):
        staged.parent.rmdir()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _first_problem(problem: str | None) -> str | None:
    """The first rank's problem, on every rank: all refuse together instead of some waiting in a collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return problem
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problem)
    return next((p for p in gathered if p), None)


class AtomicCheckpoints:
    """Trainer mixin: checkpoint-N is written under checkpoints/.saving/ and renamed into place when whole,
    after a check that the disk has room for it. `run_identity` (a dict) is saved into each checkpoint."""

    run_identity: dict | None = None
    resumed_at_end = False  # resumed from a checkpoint at the last step: no step trained, only loaded
    _staging_save = False

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._staging_save else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = Path(super()._get_output_dir(trial))
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged = run_dir / STAGING / final.name
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)  # an earlier save of this step that was cut short
        previous = newest_complete(run_dir)
        needed = expected_checkpoint_bytes(self.model, self.is_deepspeed_enabled, previous)
        what = f"checkpoint {final} was not saved" + (
            f" (the newest complete checkpoint, {previous.name}, is intact)" if previous else "")
        problem = _first_problem(shortage(run_dir, needed))  # a collective: also keeps ranks clear of the rmtree
        if problem:
            raise DiskFullError(f"{what}: {problem}")
        self._staging_save = True
        try:
            with full_disk_as_error(final, needed, what, cleanup=lambda: _discard(staged)):
                super()._save_checkpoint(model, trial)
                if best_checkpoint.published(self.state, run_dir, final) and self.args.should_save:
                    self.state.save_to_json(str(staged / STATE_FILE))  # as the Trainer wrote it, with that path
                if self.args.should_save and self.run_identity is not None:
                    (staged / RESUME_FILE).write_text(json.dumps(self.run_identity, indent=2), encoding="utf-8")
        finally:
            self._staging_save = False
        _barrier()  # every rank's shards are written before the folder is renamed
        if self.args.should_save:
            publish(staged, final)
            _discard(staged)
            rotate_checkpoints(str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint)
        _barrier()

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs,
                             resume_from_checkpoint, trial):
        result = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                              resume_from_checkpoint, trial)
        if resume_from_checkpoint is None or self.state.global_step < max_steps:
            return result
        if (Path(self.args.output_dir).parent / METADATA_FILE).is_file():
            raise VlmtuneError(f"train.resume_from_checkpoint: {resume_from_checkpoint} is at step "
                               f"{self.state.global_step} and this recipe trains {max_steps} steps: that run is "
                               "finished, nothing is left to train. To train it further raise train.max_steps (or "
                               "train.num_train_epochs); to start over use another output_dir or --overwrite")
        # a run that failed after its last checkpoint (final eval, a full disk in the final write): the loop runs
        # no epoch, the checkpoint is loaded as for any resume, and the outputs are written from it
        self.resumed_at_end = True
        return num_train_epochs, 0


def logged_train_metrics(checkpoint: str) -> dict:
    """train_results.json's training figures for a run whose outputs are written from its last checkpoint (the
    steps ran in an earlier process): train_loss is the mean of the losses logged in the checkpoint's state."""
    state = json.loads((Path(checkpoint) / STATE_FILE).read_text(encoding="utf-8"))
    total = last = 0
    for entry in (h for h in state.get("log_history", []) if "loss" in h and "step" in h):
        total += entry["loss"] * (entry["step"] - last)
        last = entry["step"]
    metrics = {"outputs_from_checkpoint": str(checkpoint), "total_flos": state.get("total_flos")}
    if last:
        metrics["train_loss"] = total / last
    return metrics
