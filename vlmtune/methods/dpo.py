"""Direct preference optimisation: TRL's DPOTrainer on vlmtune's preference pairs.

The policy is the LoRA (or QLoRA) model; the reference is the same model with the adapter disabled (a fresh
adapter), or with the adapter it started from (`dpo.init_adapter`, kept frozen by TRL as a second small adapter):
no second copy of the base weights. Log-probabilities are summed over the tokens vlmtune's labels supervise (each
reply and its end-of-turn token), on one forward of the chosen and rejected rows together."""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..data.formats import PAIR_FORMATS
from ..data.preference import is_pair_format
from ..errors import FieldError
from .base import Method


@dataclass
class DPOConfig:
    """The recipe's `dpo:` section."""

    beta: float = 0.1  # strength of the pull towards the reference model (TRL's beta)
    loss_type: str = "sigmoid"  # TRL's DPO loss: sigmoid (the DPO paper), ipo, robust, hinge, ... (installed TRL's)
    # weight of an added SFT (negative log-likelihood) term on the chosen replies, TRL's loss_type "sft" (RPO);
    # 0: none
    sft_weight: float = 0.0
    init_adapter: str | None = None  # an adapter folder (e.g. a `vlmtune sft` run) to start from, trained further


class DPO(Method):
    name = "dpo"
    section = DPOConfig
    uses_vision_cache = False  # rows are pairs; the cache keys single examples

    def validate(self, recipe, check_paths=True) -> list[FieldError]:
        s, errs = recipe.dpo, []
        known = trl_loss_types()
        if known and s.loss_type not in known:
            errs.append(FieldError("dpo.loss_type", f"must be one of the installed TRL's DPO losses: "
                                   f"{', '.join(known)}; got {s.loss_type!r}"))
        if s.sft_weight and known and "sft" not in known:
            errs.append(FieldError("dpo.sft_weight", "the installed TRL's DPOTrainer has no SFT term (loss_type sft); "
                                   "set it to 0 or upgrade trl"))
        if s.sft_weight and s.loss_type == "sft":
            errs.append(FieldError("dpo.sft_weight", "loss_type is sft already; set sft_weight to 0"))
        if recipe.method != self.name:
            return errs
        if not is_pair_format(recipe.data.format):
            errs.append(FieldError("data.format", f"must be a preference layout for method dpo "
                                   f"({', '.join(PAIR_FORMATS)}: data_templates/README.md), got {recipe.data.format!r}"))
        if check_paths and s.init_adapter and not (Path(s.init_adapter) / "adapter_config.json").is_file():
            errs.append(FieldError("dpo.init_adapter", f"{s.init_adapter} holds no adapter_config.json; give the "
                                   "folder a vlmtune sft run wrote (its output_dir)"))
        if recipe.train.packing:
            errs.append(FieldError("train.packing", "is not supported with method dpo (each pair is one row of its "
                                   "own); set it to false"))
        if recipe.train.eval_metrics:
            errs.append(FieldError("train.eval_metrics", "is not supported with method dpo (eval rows are pairs; "
                                   "its eval logs rewards/accuracies and margins); leave it empty"))
        if str(recipe.train.cache_vision_features).lower() == "true":
            errs.append(FieldError("train.cache_vision_features", "is not supported with method dpo yet; set it to "
                                   "auto or false"))
        return errs

    def init_adapter(self, recipe):
        return recipe.dpo.init_adapter

    def datasets(self, plan, vision, log=print):
        from ..data.pair_batches import to_pair_dataset

        def dataset(prepared):
            return to_pair_dataset(prepared.pairs, plan.family, plan.processor, plan.model_config, mark_bad=True)

        lengths = [len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in plan.train.pairs]
        return dataset(plan.train), (dataset(plan.eval) if plan.eval else None), lengths

    def collator(self, plan, pad_token_id, pad_to_multiple_of, attention):
        from ..data.collator import collator_for
        from ..data.pair_batches import PreferenceCollator

        return PreferenceCollator(collator_for(plan.family, pad_token_id, pad_to_multiple_of=pad_to_multiple_of))

    def trainer_args(self, make, recipe):
        from trl import DPOConfig as TRLConfig

        s = recipe.dpo
        losses, weights = [s.loss_type], None
        if s.sft_weight:
            losses, weights = [s.loss_type, "sft"], [1.0, s.sft_weight]
        return make(TRLConfig, beta=s.beta, loss_type=losses, loss_weights=weights, max_length=None)

    def trainer_bases(self):
        from trl import DPOTrainer

        return PairRows, DPOTrainer

    def size(self, prepared) -> int:
        return len(prepared.pairs)

    def num_tokens(self, prepared) -> int:
        return sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in prepared.pairs)

    def num_supervised(self, prepared) -> int:
        return sum(p.chosen.num_supervised + p.rejected.num_supervised for p in prepared.pairs)


@functools.lru_cache(maxsize=1)
def trl_loss_types() -> tuple[str, ...]:
    """The DPO losses the installed TRL names in its DPOConfig, read from its source (importing trl takes seconds);
    empty when it cannot be read (TRL then checks the value itself)."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return ()
    path = Path(next(iter(spec.submodule_search_locations))) / "trainer" / "dpo_config.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return ()
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "loss_type":
            for text in (n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)):
                found = re.findall(r"`'([a-z_0-9]+)'`", text)
                if found:
                    return tuple(dict.fromkeys(found))
    return ()


class PairRows:
    """DPOTrainer mixin: vlmtune's pair rows are formatted and collated by vlmtune, never tokenized again."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset

    def compute_loss(self, *args, **kwargs):
        with warnings.catch_warnings():  # TRL's reference pass asks for a name transformers 5 deprecates
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return super().compute_loss(*args, **kwargs)
