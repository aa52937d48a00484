"""Everything checked before a GPU minute is spent: recipe, model, machine, and every data row.

The recipe is resolved here once (`resolve`: family, runtime, the filled DeepSpeed config, the number of
processes, the model's path) into the `Plan` that model loading and the trainer set-up read."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from . import vision_cache
from .config import FieldError, Recipe
from .data import prepared_cache
from .data.formats import reader_options
from .data.formatting import Formatter
from .data.preference import PreparedPairs, is_pair_format, prepare_pairs
from .data.prepare import PreparedData, prepare
from .distributed.deepspeed import for_run as deepspeed_for_run
from .distributed.deepspeed import zero_stage
from .distributed.launch import planned_world_size
from .errors import PreflightError
from .families import Family
from .main_decides import decided_by_main
from .modeling import Runtime, check_model, load_processor, resolve_model_path, runtime_for


@dataclass
class Resolved:
    """The recipe resolved once, before any data is read; what the model loading and the trainer read instead of
    deriving it from the recipe again."""

    recipe: Recipe
    model_config: object
    family: Family
    runtime: Runtime  # device, dtype, attention kernel
    model_path: str  # where the weights are read: a hub id, an absolute folder, a built-in model's cache folder
    deepspeed: dict | None  # the DeepSpeed config, every `auto` the recipe decides filled and validated; None: none
    world_size: int  # processes of the run
    processor: object
    formatter: Formatter

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.deepspeed) if self.deepspeed is not None else 0


@dataclass
class Plan(Resolved):
    """A checked run: the resolved recipe and its data, already formatted."""

    train: PreparedData
    eval: PreparedData | None


def resolve(recipe: Recipe) -> Resolved:
    """Model, family, runtime, DeepSpeed config and processor for a recipe; PreflightError listing every problem."""
    from .liger import choose as liger_choice

    errors, model_config, family = check_model(recipe)
    errors.extend(reporting_errors(recipe))
    world = planned_world_size(recipe)
    runtime = deepspeed = None
    if family is not None:
        runtime = runtime_for(recipe, family)
        deepspeed, problems = deepspeed_for_run(recipe, runtime, model_config, world)
        errors.extend(problems)
        kernels = liger_choice(recipe.train.liger_kernel, family, runtime.device)
        errors.extend([kernels.problem] if kernels.problem else [])
        runtime = replace(runtime, liger=kernels.use, liger_note=kernels.reason)
        errors.extend(vision_cache.problems(recipe, family, zero_stage(deepspeed) if deepspeed else 0, world))
    if family is None or errors:
        raise PreflightError([str(e) for e in errors])
    processor = load_processor(recipe, family)
    formatter = Formatter(family, processor, recipe.data.train_on, recipe.data.system_prompt)
    return Resolved(recipe, model_config, family, runtime, resolve_model_path(recipe.model.name_or_path), deepspeed,
                    world, processor, formatter)


def formatting_for(recipe: Recipe) -> tuple[object, Family, Formatter]:
    """Model config, family and formatter (processor inside) for a recipe; PreflightError if the model is wrong."""
    r = resolve(recipe)
    return r.model_config, r.family, r.formatter


_PIP_NAMES = {"azure_ml": "azureml-core", "comet_ml": "comet-ml", "flyte": "flytekit"}


def reporting_errors(recipe: Recipe) -> list[FieldError]:
    """train.report_to: each integration known and installed (else the Trainer fails later, in its set-up)."""
    wanted = [name for name in recipe.train.report_to if name not in ("none", "all")]
    if not wanted:
        return []
    from transformers.integrations import integration_utils as integrations

    installed = set(integrations.get_available_reporting_integrations())
    errors = []
    for name in wanted:
        if name not in integrations.INTEGRATION_TO_CALLBACK:
            errors.append(FieldError("train.report_to", f"unknown integration {name!r}; known: none, all, "
                                     f"{', '.join(sorted(integrations.INTEGRATION_TO_CALLBACK))}"))
        elif name not in installed:
            errors.append(FieldError("train.report_to", f"{name} is not installed: pip install "
                                     f"{_PIP_NAMES.get(name, name)}, or set train.report_to: none"))
    return errors


def check_data(recipe: Recipe, family: Family, formatter: Formatter, check_images: str | None = None,
               find_shrinkable: bool = False) -> tuple[dict[str, PreparedData | PreparedPairs], list[str]]:
    """Every data split read and formatted (PreparedPairs for a preference data.format), and the problems that
    would stop training.

    Images are checked as `check_images` says (default: data.check_images); `find_shrinkable` also finds the
    too-long rows data.on_overlong=shrink_images would keep (validate reports them)."""
    d = recipe.data
    check_images = check_images or d.check_images
    problems: list[str] = []
    splits = {}
    for split in ("train", "eval"):
        path = getattr(d, split)
        if not path:
            continue
        data = _prepared(recipe, split, family, formatter, check_images, find_shrinkable)
        problems.extend(str(p) for p in data.problems)
        if data.rows and not data.kept() and not data.problems:
            problems.append(f"{path}: every row was dropped as too long for data.max_length={d.max_length}")
        if data.rows == 0:
            problems.append(f"data.{split}: {path} has no rows")
        splits[split] = data
    return splits, problems


def _prepared(recipe: Recipe, split: str, family: Family, formatter: Formatter, check_images: str,
              find_shrinkable: bool) -> PreparedData | PreparedPairs:
    """One split prepared, from the prepared-data cache when data.cache is on. With several processes rank 0
    prepares (or loads) and stores the entry, the others load it (preparing themselves if they cannot read it:
    another machine's disk)."""
    d = recipe.data
    path = getattr(d, split)

    def build(check: str, sizes: dict | None = None) -> PreparedData:
        if is_pair_format(d.format):  # preference rows: a split of pairs of examples
            return prepare_pairs(recipe, family, formatter, split, check_images=check,
                                 find_shrinkable=find_shrinkable, sizes=sizes)
        return prepare(path, d.format, d.image_root, formatter, family, d.max_length, d.on_overlong,
                       desc=f"checking {split} data", read_options=reader_options(d), check_images=check,
                       max_image_pixels=d.max_image_pixels, find_shrinkable=find_shrinkable, sizes=sizes)

    if not d.cache:
        return build(check_images)

    def key_for(shrinkable: bool) -> str:
        return prepared_cache.cache_key(path, d, family.name, formatter.processor,
                                        {"check_images": check_images, "find_shrinkable": shrinkable})

    def main_entry() -> str:
        if not find_shrinkable:  # validate's entry (it also found the shrinkable rows) holds the same examples
            fuller = key_for(True)
            if prepared_cache.load(fuller) is not None:
                return fuller
        key = key_for(find_shrinkable)
        if prepared_cache.load(key) is None:
            sizes: dict = {}
            prepared_cache.store(key, build(check_images, sizes), sizes)
        return key

    key = decided_by_main(main_entry, cuda=not recipe.train.use_cpu)
    return prepared_cache.load(key) or build(check_images)


def plan_run(recipe: Recipe) -> Plan:
    """Resolve the recipe, read and format all data; raise PreflightError listing every problem."""
    resolved = resolve(recipe)
    splits, problems = check_data(recipe, resolved.family, resolved.formatter, images_checked_here(recipe))
    problems.extend(_zero3_video_problems(resolved.zero_stage, splits))
    if problems:
        raise PreflightError(problems)
    return Plan(**vars(resolved), train=splits["train"], eval=splits.get("eval"))


def images_checked_here(recipe: Recipe) -> str:
    """How this process checks images before training: as data.check_images says on the first process of each
    machine (LOCAL_RANK 0), from their headers only on the others. Every process reads the same files, so one
    full decode per machine finds a broken file before training, where it stops the run; the other processes
    then hold the same examples, and the bad-sample guard still catches a file that breaks mid-run."""
    return recipe.data.check_images if int(os.environ.get("LOCAL_RANK", "0")) <= 0 else "header"


def _zero3_video_problems(zero_stage: int, splits: dict[str, PreparedData]) -> list[str]:
    """Videos under ZeRO-3: a batch with images and videos runs the vision tower twice, a batch with only one of
    them once, so ranks would gather weights a different number of times and hang. Refused until handled."""
    if zero_stage != 3:
        return []
    return [f"data.{split}: {sum(1 for e in data.examples if e.videos)} rows hold videos, which ZeRO-3 does not "
            "support yet (ranks could run the vision tower a different number of times and hang); use "
            "distributed.deepspeed=zero2" for split, data in splits.items() if any(e.videos for e in data.examples)]
