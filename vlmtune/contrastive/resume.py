"""What a contrastive checkpoint records about its run, and the refusal to resume it with a different training:
the recipe fields SFT compares (checkpoints.MAY_DIFFER lists those that may change), the number of processes
(part of the batch, and of the in-batch negatives) and the train pairs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import VlmtuneError

ONLY_MEASURE = {"contrastive.eval_batch_size"}  # how many eval images are embedded at a time: not the training


def run_identity(recipe, pairs) -> dict:
    from ..distributed import world_size

    rows = json.dumps([[p.image, list(p.captions)] for p in pairs])
    return {"recipe": recipe.to_dict(), "world_size": world_size(),
            "train_data": {"pairs": len(pairs), "captions": sum(len(p.captions) for p in pairs),
                           "sha256": hashlib.sha256(rows.encode()).hexdigest()}}


def check_same_run(checkpoint: str, identity: dict) -> None:
    """VlmtuneError naming every field in which this run differs from the one that saved `checkpoint`."""
    from ..checkpoints import RESUME_FILE, recipe_differences

    path = Path(checkpoint) / RESUME_FILE
    if not path.is_file():
        raise VlmtuneError(f"train.resume_from_checkpoint: {checkpoint} has no {RESUME_FILE}, so it was not saved "
                           "by a contrastive run; give a checkpoint-N folder of this run, or latest")
    saved = json.loads(path.read_text(encoding="utf-8"))
    changed = [f"{key}: {old!r} -> {new!r}" for key, old, new in recipe_differences(saved["recipe"], identity["recipe"])
               if key not in ONLY_MEASURE]
    if saved.get("world_size") != identity["world_size"]:
        changed.append(f"processes (world size: the batch and its negatives): {saved.get('world_size')} -> "
                       f"{identity['world_size']}")
    before, now = saved.get("train_data") or {}, identity["train_data"]
    if before != now:
        changed.append(f"data.train content: {before.get('pairs')} pairs, {before.get('captions')} captions -> "
                       f"{now['pairs']} pairs, {now['captions']} captions" +
                       (" (other rows, the same counts)" if (before.get("pairs"), before.get("captions")) ==
                        (now["pairs"], now["captions"]) else ""))
    if changed:
        listed = "\n".join(f"  - {c}" for c in changed)
        raise VlmtuneError(f"train.resume_from_checkpoint: {checkpoint} was saved by a run that trained otherwise; "
                           f"resuming it with this recipe would mix two trainings:\n{listed}\nSet those back to "
                           "resume, or start a new run (another output_dir, or --overwrite)")
