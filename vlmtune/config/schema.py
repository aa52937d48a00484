"""The recipe's schema: one dataclass per section with its defaults, the fixed choices, and the type helpers."""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field

from ..data.conversation import TrainOn
from ..data.formats import FORMATS, PAIR_FORMATS
from ..embedding.registry import LOSSES, TOWERS
from ..methods.contrastive import ContrastiveConfig
from ..methods.dpo import DPOConfig
from ..reporting import default_report_to


@dataclass
class ModelConfig:
    name_or_path: str = ""
    family: str = "auto"
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass
class QuantizationConfig:
    mode: str = "none"  # none | 4bit | 8bit
    quant_type: str = "nf4"  # nf4 | fp4
    double_quant: bool = True
    compute_dtype: str = "bfloat16"


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: the family's default (language model linear layers)
    train_vision_tower: bool = False
    train_projector: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    use_rslora: bool = False
    towers: str = "both"  # method contrastive: LoRA on both | vision | text tower of the dual encoder


@dataclass
class DataConfig:
    train: str = ""
    eval: str | None = None
    format: str = "messages"  # row layout: data.formats.FORMATS or PAIR_FORMATS (data_templates/README.md)
    image_root: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # layout field -> column/key name in the data
    caption_prompt: str = "Describe this image."  # the user prompt of format: caption
    allow_urls: bool = False  # download http(s) image URLs into the cache
    max_length: int = 2048
    min_pixels: int | None = None
    max_pixels: int | None = None
    video_fps: float = 2.0  # frames sampled per second of video (a frame list is taken as sampled at this rate)
    video_max_frames: int = 32  # at most this many frames per video (the count is padded to an even number)
    video_min_pixels: int | None = None  # pixel bounds of videos as the family's video processor applies them; None: its own
    video_max_pixels: int | None = None
    train_on: str = "assistant"
    system_prompt: str | None = None
    on_overlong: str = "drop"  # drop | error | shrink_images
    num_workers: int | None = None  # DataLoader workers decoding images; None: chosen from the CPUs (loader_sizing.py)
    prefetch_factor: int | None = None  # batches each DataLoader worker loads ahead; None: chosen (loader_sizing.py)
    check_images: str = "auto"  # auto | decode | header: decode every image before training, or read headers only
    max_image_pixels: int = 178_956_970  # larger images (width x height) are refused: decompression-bomb guard
    max_bad_samples: int = 10  # samples that fail to load mid-run are skipped up to this many; 0: stop on the first
    max_row_bytes: int = 16 * 2**20  # a data row (a JSONL line, a JSON item) larger than this is refused unread
    # formatted examples cached under $VLMTUNE_CACHE/prepared/, keyed by the data files, data.*, processor files,
    # family, code and library versions (data/prepared_cache.py): a second run, validate, inspect and every rank
    # but 0 start from it; on by default (a changed input misses it; an unwritable cache is no error)
    cache: bool = True
    # `vlmtune validate --near-duplicates`: images whose perceptual hashes are at most this many bits apart (of 64)
    # are near-duplicates (vlmtune/hygiene/); None: --hash-distance, else 8
    near_duplicate_distance: int | None = None


@dataclass
class TrainConfig:
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 1
    gradient_accumulation_steps: int = 8
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    # auto | true | false (YAML booleans too); auto: on only when a measured step without it would not fit in
    # memory (memory_probe.py), on under ZeRO-3 and quantization (see there why)
    gradient_checkpointing: str = "auto"
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    eval_steps: int | None = None
    seed: int = 42
    # integrations the Trainer logs to; default: tensorboard when installed (event files under output_dir/logs/)
    report_to: list[str] = field(default_factory=default_report_to)
    use_cpu: bool = False
    resume_from_checkpoint: str | None = None  # "latest" (newest in output_dir/checkpoints) or a checkpoint folder
    group_by_length: bool = False  # batches of similar lengths: less padding, a little less randomness
    max_nonfinite_steps: int = 3  # stop (saving nothing non-finite) after this many steps with a NaN/inf loss or grad
    # auto | true | false: a frozen vision tower and projector run once per example, their outputs stored under
    # $VLMTUNE_CACHE/vision/ and fed to every later step (vision_cache.py); auto: when frozen and the data is seen
    # more than once; true where it cannot work is refused
    cache_vision_features: str = "auto"
    # whole examples packed into rows of up to data.max_length tokens, no attention across them (data/packing.py);
    # per_device_train_batch_size then counts packed rows; refused for families whose Family.packing_refused says why
    packing: bool = False
    # the LM head and cross-entropy run only on positions whose next token has a label, in chunks (label_loss.py):
    # the same loss and gradients as the full logits, without building them; false: the SFTTrainer's own loss
    loss_on_labels_only: bool = True
    # auto | true | false: Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) on the model (liger.py); auto: on a CUDA
    # GPU with liger-kernel installed, for families whose Family.liger it patches; true where it cannot is refused
    liger_kernel: str = "auto"
    # at each evaluation the first eval_generate_samples eval rows also get a greedy reply (at most
    # eval_max_new_tokens tokens), scored by these metrics (`vlmtune eval`'s, auto included) and logged as eval_<key>
    eval_metrics: list[str] = field(default_factory=list)
    eval_generate_samples: int = 32
    eval_max_new_tokens: int = 64
    # eval_loss | eval_<key of an eval metric>: the final adapter is the evaluated checkpoint best by it (loss:
    # lowest, metrics: highest); needs train.eval_steps, with train.save_steps a multiple of it
    best_metric: str | None = None


@dataclass
class DistributedConfig:
    """Multi-process training on DeepSpeed ZeRO (README: Multi-GPU / multi-node)."""

    deepspeed: str = "none"  # none | zero2 | zero3 | zero3_offload | path to a DeepSpeed JSON config
    num_processes: int | None = None  # per node; None: every local GPU with deepspeed set, else 1
    num_nodes: int = 1
    node_rank: int | None = None  # None: $NODE_RANK, else 0
    master_addr: str | None = None  # None: $MASTER_ADDR, else 127.0.0.1 (single node)
    master_port: int | None = None  # None: $MASTER_PORT, else 29500
    hostfile: str | None = None  # DeepSpeed hostfile (`host slots=N` lines): the deepspeed launcher starts every node
    launcher: str = "auto"  # auto | torchrun | deepspeed | accelerate; auto: deepspeed with a hostfile, else torchrun


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    method: str = "sft"  # the training method: a name in vlmtune.methods (sft | dpo | contrastive); its section is named like it
    dpo: DPOConfig = field(default_factory=DPOConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    output_dir: str = "runs/vlmtune"
    source: str | None = field(default=None, metadata={"internal": True})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d


CHOICES = {
    "model.dtype": ("auto", "bfloat16", "float16", "float32"),
    "model.attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "quantization.mode": ("none", "4bit", "8bit"),
    "quantization.quant_type": ("nf4", "fp4"),
    "quantization.compute_dtype": ("bfloat16", "float16", "float32"),
    "data.format": (*FORMATS, *PAIR_FORMATS),
    "data.train_on": tuple(t.value for t in TrainOn),
    "data.on_overlong": ("drop", "error", "shrink_images"),
    "data.check_images": ("auto", "decode", "header"),
    "train.cache_vision_features": ("auto", "true", "false"),
    "train.lr_scheduler_type": ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
                                "polynomial", "inverse_sqrt"),
    "train.optim": ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
                    "adafactor", "sgd"),
    "distributed.launcher": ("auto", "torchrun", "deepspeed", "accelerate"),
    "train.gradient_checkpointing": ("auto", "true", "false"),
    "train.liger_kernel": ("auto", "true", "false"),
    "lora.towers": TOWERS,
    "contrastive.loss": ("auto", *LOSSES),
}
ALIASES = {"train.cache_vision_features": {True: "true", False: "false"},
           "model.dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16"},
           "quantization.compute_dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"},
           "quantization.mode": {"4-bit": "4bit", "qlora": "4bit", "8-bit": "8bit", None: "none", False: "none"},
           "distributed.deepspeed": {None: "none", False: "none", "zero-2": "zero2", "zero-3": "zero3",
                                     "zero3-offload": "zero3_offload", "zero-3-offload": "zero3_offload"},
           "train.gradient_checkpointing": {True: "true", False: "false"},
           "train.liger_kernel": {True: "true", False: "false"}}


def switch(value: object) -> str:
    """An auto | true | false field's value as its word (a Recipe built in code may hold a Python bool)."""
    return {True: "true", False: "false"}.get(value, value) if isinstance(value, bool) else str(value)


@functools.lru_cache(maxsize=1)
def schema() -> dict[str, object]:
    """Every dotted path of the recipe, sections and fields, mapped to its type hint, in the order written."""
    out: dict[str, object] = {}

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("internal"):
                out[prefix + f.name] = hints[f.name]
                if dataclasses.is_dataclass(hints[f.name]):
                    walk(hints[f.name], f"{prefix}{f.name}.")

    walk(Recipe, "")
    return out


def numeric_fields() -> dict[str, type]:
    """Dotted path -> int or float, for every number field of the recipe (optional ones included)."""
    out = {}
    for path, hint in schema().items():
        kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if len(kinds) == 1 and kinds[0] in (int, float):
            out[path] = kinds[0]
    return out


def describe(hint) -> str:
    """A type hint in words, as error messages say it ("an integer or null")."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is list:
        return f"a list of {describe(args[0])}s"
    if args and origin is not list:
        return " or ".join(describe(a) for a in args) + " or null"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def show(value) -> str:
    """A value as an error message quotes it (strings in quotes)."""
    return repr(value) if isinstance(value, str) else str(value)
