"""The embedding-family registry: dual encoders (an image tower and a text tower meeting in one space).

A sibling of `families/` rather than part of it: the VLM `Family` describes a chat model (placeholders, chat
template, image plans, the language model's prefix), none of which a dual encoder has; what a dual encoder needs
instead (its two towers, their projections, its temperature parameters, its loss, how its texts are padded) is
here. Each family module registers with one line in `FAMILY_MODULES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import VlmtuneError

LOSSES = ("infonce", "sigmoid")
TOWERS = ("both", "vision", "text")


@dataclass(frozen=True)
class EmbeddingFamily:
    """What vlmtune needs to know about a dual-encoder family."""

    name: str
    model_types: tuple[str, ...]
    description: str
    model_class: str  # the transformers class (by name) that loads the family's checkpoints
    loss: str  # the family's own contrastive loss (one of LOSSES); `contrastive.loss` overrides it
    towers: dict[str, str]  # tower name (vision | text) -> module prefix of that tower in the model
    projections: dict[str, str]  # tower name -> module (path) projecting that tower into the shared space
    temperature: tuple[str, ...]  # the learnable scalar parameters of the logits (logit_scale, logit_bias)
    text_padding: str = "longest"  # how texts are padded (SigLIP was trained on max_length padding)
    # the LoRA target pattern inside one tower's prefix: its encoder layers' attention and MLP linears
    layer_targets: str = r"encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc1|mlp\.fc2)"
    tiny_name: str = ""
    build_tiny: Callable[[], tuple[object, type, object]] | None = None  # () -> (config, model class, processor)
    init_tiny: Callable[[object], None] | None = None  # sets what a random init gets wrong in the tiny model

    def load_class(self):
        import transformers

        return getattr(transformers, self.model_class)

    def lora_target_regex(self, towers: str = "both") -> str:
        """One regex (PEFT matches it against the whole module name) for the LoRA layers of the chosen towers."""
        prefixes = [self.towers[t] for t in self.trained_towers(towers)]
        return rf"^({'|'.join(prefixes)})\.{self.layer_targets}$"

    @property
    def skip_quantization(self) -> tuple[str, ...]:
        """Modules kept out of 4-bit: the projections (trained in full; SigLIP's vision head holds an
        nn.MultiheadAttention, whose out_proj weight must stay a plain Linear's)."""
        return tuple(self.projections.values())

    def trained_towers(self, towers: str) -> tuple[str, ...]:
        if towers not in TOWERS:
            raise VlmtuneError(f"lora.towers: {towers!r} is not one of {', '.join(TOWERS)}")
        return ("vision", "text") if towers == "both" else (towers,)

    def trained_projections(self, towers: str) -> list[str]:
        """The projection modules that train with the chosen towers (a frozen tower keeps its projection)."""
        return [self.projections[t] for t in self.trained_towers(towers)]


_FAMILIES: dict[str, EmbeddingFamily] = {}
_BY_MODEL_TYPE: dict[str, EmbeddingFamily] = {}


def register(family: EmbeddingFamily) -> EmbeddingFamily:
    """Add a family; a second one with the same name or model_type is an error."""
    if family.name in _FAMILIES:
        raise ValueError(f"embedding family {family.name!r} is already registered")
    for model_type in family.model_types:
        if model_type in _BY_MODEL_TYPE:
            raise ValueError(f"model_type {model_type!r} is already handled by {_BY_MODEL_TYPE[model_type].name!r}")
    _FAMILIES[family.name] = family
    _BY_MODEL_TYPE.update(dict.fromkeys(family.model_types, family))
    return family


def names() -> list[str]:
    return sorted(_FAMILIES)


def all_families() -> list[EmbeddingFamily]:
    return [_FAMILIES[n] for n in names()]


def get(name: str) -> EmbeddingFamily:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise VlmtuneError(f"unknown embedding family {name!r}; supported: {', '.join(names())}") from None


def is_embedding_family(name: str) -> bool:
    return name in _FAMILIES


def for_model_type(model_type: str, where: str = "the model") -> EmbeddingFamily:
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise VlmtuneError(f"{where} has model_type {model_type!r}, not a supported embedding model; supported model "
                           f"types: {', '.join(sorted(_BY_MODEL_TYPE))}") from None


def by_tiny_name(name: str) -> EmbeddingFamily:
    for family in _FAMILIES.values():
        if family.tiny_name == name:
            return family
    raise VlmtuneError(f"unknown builtin embedding model {name!r}; known: "
                       f"{', '.join(sorted(f.tiny_name for f in _FAMILIES.values() if f.tiny_name))}")


FAMILY_MODULES = ("clip", "siglip")


def _register_modules() -> None:
    import importlib

    for module in FAMILY_MODULES:
        for family in importlib.import_module(f"{__package__}.{module}").FAMILIES:
            register(family)
