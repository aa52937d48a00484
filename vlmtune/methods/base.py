"""What a training method provides: its recipe section, how the plan's examples become its dataset rows, its
collator, and its TRL trainer. The shared run around it (run folder, plan, model loading, quantization, LoRA,
guards, atomic checkpoints and outputs) lives in vlmtune/training.py and knows no method by name.

A method module imports nothing from the recipe or run layers (config, preflight, training): the registry is read
by recipe validation, upstream of them. What the trainer needs from the shared run it receives as arguments."""

from __future__ import annotations

from ..errors import FieldError


class Method:
    """A training method. Subclasses set `name` and `section` and override the steps that differ from SFT's.

    The rows become examples in preflight by data.format (pair layouts: data/preference.py's PreparedPairs)."""

    name: str = ""
    section: type | None = None  # the dataclass of its recipe section (the recipe field named like the method)
    uses_vision_cache: bool = True  # whether train.cache_vision_features applies to its batches
    # a method whose model is no VLM (a dual encoder) trains, validates and evaluates through a run-layer module of
    # its own, named here (a name, not an import: the method module stays upstream of the run layer): its
    # `run(recipe, log, overwrite)` -> (output folder, metrics), `check(recipe, decode_images)` -> a report with
    # `ok`, `family`, `render()`, `evaluate(model, data, *, batch_size, out, overwrite, log, **options)` -> a result
    # with `summary`, `render()`. The shared run (training.py, preflight) assumes a VLM family and token examples.
    own_run: str | None = None
    # recipe fields whose default differs for this method (dotted path -> value), used where the recipe leaves
    # them unset
    defaults: dict[str, object] = {}

    def settings(self, recipe):
        """The recipe's section of this method (None for a method without one)."""
        return getattr(recipe, self.name) if self.section is not None else None

    def validate(self, recipe, check_paths: bool = True) -> list[FieldError]:
        """Problems with the recipe's section of this method, and, where the recipe names this method, with shared
        fields it cannot use; `check_paths`: also whether the files it names exist."""
        return []

    def model_families(self) -> list[str] | None:
        """The names model.family may take besides auto; None: the VLM families (vlmtune.families)."""
        return None

    def eval_keys(self, recipe) -> list[str] | None:
        """The metrics its own evaluation logs (train.best_metric's choices); None: eval_loss and train.eval_metrics'."""
        return None

    def init_adapter(self, recipe) -> str | None:
        """An adapter folder training starts from (loaded trainable), None for a fresh LoRA adapter."""
        return None

    def datasets(self, plan, vision, log=print) -> tuple[object, object, list[int]]:
        """(train dataset, eval dataset or None, a length per train dataset row)."""
        raise NotImplementedError

    def collator(self, plan, pad_token_id: int, pad_to_multiple_of: int | None, attention: str):
        raise NotImplementedError

    def trainer_args(self, make, recipe):
        """The TRL config of its trainer: `make(config_cls, **its own arguments)` adds those every method shares
        (training.trainer_args)."""
        raise NotImplementedError

    def trainer_bases(self) -> tuple[type, ...]:
        """Its own trainer mixins, then its TRL trainer class (last); training.py puts the shared mixins around."""
        raise NotImplementedError

    def trainer_kwargs(self, plan, lengths: list[int]) -> dict:
        """Extra keyword arguments of its trainer class."""
        return {}

    def size(self, prepared) -> int:
        """How many training rows one prepared split holds."""
        return len(prepared.examples)

    def num_tokens(self, prepared) -> int:
        """The tokens of one prepared split's rows (padding aside)."""
        return prepared.num_tokens

    def num_supervised(self, prepared) -> int:
        return prepared.num_supervised

    def data_metrics(self, prepared) -> dict:
        """Counts of one prepared split for train_results.json."""
        tokens, supervised = self.num_tokens(prepared), self.num_supervised(prepared)
        return {"train_examples": self.size(prepared), "train_dropped": len(prepared.dropped),
                "train_tokens_per_epoch": tokens, "train_supervised_tokens_per_epoch": supervised,
                "supervised_fraction": supervised / tokens if tokens else 0.0}
