"""Multi-process runs: launcher detection and re-launch, DeepSpeed set-up, and the ZeRO traps.

- `vlmtune sft` asked for more than one process (distributed.num_processes / num_nodes / hostfile, or
  every local GPU with distributed.deepspeed set) starts itself again under torchrun, the deepspeed
  launcher or `accelerate launch`; a process already started by one of them (RANK / LOCAL_RANK /
  WORLD_SIZE in the environment) is never re-launched.
- ZeRO-3 partitions every weight and gathers it, collectively, when its module runs: every rank must
  run the vision tower the same number of times. A batch without images runs it on a tiny dummy
  image from the model's own image processor, whose output is added to the loss times zero.
- ZeRO-3 leaves each rank holding a slice of every weight: the adapter is gathered before it is saved.
"""

from __future__ import annotations

import inspect
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import torch

from . import deepspeed_config
from .config import FieldError, Recipe
from .errors import VlmtuneError
from .modeling import runtime_for

LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
DEFAULT_PORT = 29500


# ------------------------------------------------------------------ where this process stands
def under_launcher(env=None) -> bool:
    """Started by torchrun, the deepspeed launcher or `accelerate launch` (they all set these)."""
    env = os.environ if env is None else env
    return "WORLD_SIZE" in env and ("RANK" in env or "LOCAL_RANK" in env)


def world_size(env=None) -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE", "1"))


def rank(env=None) -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    env = os.environ if env is None else env
    return int(env.get("RANK", "0"))


def is_main_process(env=None) -> bool:
    return rank(env) == 0


def processes_per_node(recipe: Recipe) -> int:
    """distributed.num_processes, else every local GPU when DeepSpeed is asked for, else one."""
    d = recipe.distributed
    if d.num_processes:
        return d.num_processes
    if d.deepspeed != "none" and not recipe.train.use_cpu and torch.cuda.is_available():
        return max(1, torch.cuda.device_count())
    return 1


def needs_launch(recipe: Recipe, env=None) -> bool:
    """More than one process asked for, and this process was not started by a launcher."""
    if under_launcher(env):
        return False
    d = recipe.distributed
    return processes_per_node(recipe) > 1 or d.num_nodes > 1 or bool(d.hostfile)


def launcher_for(recipe: Recipe) -> str:
    d = recipe.distributed
    if d.launcher != "auto":
        return d.launcher
    return "deepspeed" if d.hostfile else "torchrun"


# ------------------------------------------------------------------ re-launch
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rendezvous(recipe: Recipe, env) -> tuple[str, int, int]:
    """(master address, master port, node rank) from the recipe, else the usual environment variables."""
    d = recipe.distributed
    addr = d.master_addr or env.get("MASTER_ADDR")
    port = d.master_port or (int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None)
    node_rank = d.node_rank if d.node_rank is not None else int(env.get("NODE_RANK", "0"))
    if d.num_nodes > 1 and not d.hostfile and not addr:
        raise VlmtuneError("distributed.num_nodes > 1 needs distributed.master_addr (or $MASTER_ADDR): the address "
                           "of node 0 that every node can reach; or give a DeepSpeed hostfile")
    if node_rank >= d.num_nodes:
        raise VlmtuneError(f"node rank {node_rank} (distributed.node_rank or $NODE_RANK) must be below "
                           f"distributed.num_nodes={d.num_nodes}")
    single = d.num_nodes == 1 and not d.hostfile
    return addr or "127.0.0.1", port or (free_port() if single else DEFAULT_PORT), node_rank


def launch_command(recipe: Recipe, cli_args: list[str], entry: str | None = None, env=None) -> list[str]:
    """The command that runs `vlmtune <cli_args>` once per process.

    entry: a Python script to run in each process (a wrapper of vlmtune.cli.main); None: `-m vlmtune.cli`.
    """
    env = os.environ if env is None else env
    d = recipe.distributed
    launcher = launcher_for(recipe)
    nproc = processes_per_node(recipe)
    addr, port, node_rank = _rendezvous(recipe, env)
    cuda = torch.cuda.is_available() and not recipe.train.use_cpu
    if cuda and not d.hostfile and nproc > torch.cuda.device_count():
        raise VlmtuneError(f"distributed.num_processes={nproc} but this machine has {torch.cuda.device_count()} "
                           "GPU(s): one process per GPU")
    py = sys.executable
    if launcher == "torchrun":
        cmd = [py, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={d.num_nodes}",
               f"--node_rank={node_rank}", f"--master_addr={addr}", f"--master_port={port}"]
        target = [entry] if entry else ["-m", "vlmtune.cli"]
    elif launcher == "deepspeed":
        cmd = [py, "-m", "deepspeed.launcher.runner", "--no_local_rank", f"--master_addr={addr}",
               f"--master_port={port}"]
        if d.hostfile:
            cmd.append(f"--hostfile={d.hostfile}")
            if d.num_nodes > 1:
                cmd.append(f"--num_nodes={d.num_nodes}")
            if d.num_processes:
                cmd.append(f"--num_gpus={d.num_processes}")
        else:
            if d.num_nodes > 1:
                raise VlmtuneError("the deepspeed launcher starts several nodes from a hostfile: set "
                                   "distributed.hostfile, or use distributed.launcher=torchrun on every node")
            cmd.append(f"--num_gpus={nproc}")
        target = [entry] if entry else ["--module", "vlmtune.cli"]
    elif launcher == "accelerate":
        cmd = [py, "-m", "accelerate.commands.launch", f"--num_processes={nproc * d.num_nodes}",
               f"--num_machines={d.num_nodes}", f"--machine_rank={node_rank}", f"--main_process_ip={addr}",
               f"--main_process_port={port}", "--multi_gpu" if cuda else "--cpu"]
        target = [entry] if entry else ["-m", "vlmtune.cli"]
    else:
        raise VlmtuneError(f"unknown launcher {launcher!r}")
    return cmd + target + list(cli_args)


def entry_script(argv0: str | None = None) -> str | None:
    """The script this process runs, if it is a wrapper of vlmtune.cli (else None: `-m vlmtune.cli`)."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    path = Path(argv0)
    if path.suffix != ".py" or not path.is_file():
        return None
    package = Path(__file__).resolve().parent
    return None if package in path.resolve().parents else str(path.resolve())


def relaunch(recipe: Recipe, cli_args: list[str], entry: str | None = None, log=print) -> int:
    """Run the launcher (it starts every process of this node) and return its exit status."""
    cmd = launch_command(recipe, cli_args, entry)
    log("launching: " + " ".join(shlex.quote(c) for c in cmd))
    try:
        return subprocess.run(cmd, check=False).returncode
    except FileNotFoundError as e:
        raise VlmtuneError(f"cannot start the launcher: {e}") from None


# ------------------------------------------------------------------ DeepSpeed for a run
def ensure_process_group_env(recipe: Recipe) -> None:
    """A single process outside any launcher still needs a (one-member) process group for DeepSpeed."""
    if under_launcher():
        return
    d = recipe.distributed
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", d.master_addr or "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(d.master_port or free_port()))


def deepspeed_for_run(recipe: Recipe, runtime, model_config=None) -> dict | None:
    """The run's DeepSpeed config: the preset or file with every recipe-driven `auto` filled, validated."""
    spec = recipe.distributed.deepspeed
    if spec == "none":
        return None
    ensure_process_group_env(recipe)
    t = recipe.train
    on_gpu = runtime.device == "cuda"
    values = deepspeed_config.auto_values(
        world_size=world_size(), micro_batch=t.per_device_train_batch_size, grad_accum=t.gradient_accumulation_steps,
        max_grad_norm=t.max_grad_norm, bf16=runtime.dtype == torch.bfloat16 and on_gpu,
        fp16=runtime.dtype == torch.float16 and on_gpu, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
        hidden_size=deepspeed_config.hidden_size_of(model_config) if model_config is not None else None)
    try:
        raw = deepspeed_config.load(spec)
    except deepspeed_config.DeepSpeedConfigError as e:
        raise VlmtuneError(f"distributed.deepspeed: {e}") from None
    problems = deepspeed_config.mismatches(raw, values)
    config = deepspeed_config.fill_autos(raw, values)
    problems += deepspeed_config.validate(config, world_size=world_size())
    if problems:
        raise VlmtuneError("distributed.deepspeed: " + "; ".join(problems))
    return config


def init_deepspeed_comm() -> None:
    """Join DeepSpeed's communication layer to the process group (Accelerate does so on a GPU, not on a CPU,
    and ZeRO-3's zero.Init reads the world size from it while the model loads)."""
    import deepspeed
    from deepspeed import comm

    if not comm.is_initialized():
        deepspeed.init_distributed(auto_mpi_discovery=False)


def check_distributed(recipe: Recipe, model_config, family) -> list[FieldError]:
    """What the recipe's distributed set-up cannot do with this model on this machine."""
    d, q = recipe.distributed, recipe.quantization
    errs: list[FieldError] = []
    if d.deepspeed == "none":
        return errs
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        return [FieldError("distributed.deepspeed", f"needs the deepspeed package, which cannot be imported ({e}): "
                           "DS_BUILD_OPS=0 pip install 'vlmtune[gpu]'")]
    try:
        config = deepspeed_config.load(d.deepspeed)
    except deepspeed_config.DeepSpeedConfigError as e:
        return [FieldError("distributed.deepspeed", str(e))]
    stage = deepspeed_config.zero_stage(config)
    pre_quantized = getattr(model_config, "quantization_config", None)
    if pre_quantized is not None and stage == 3:
        method = pre_quantized.get("quant_method", "?") if isinstance(pre_quantized, dict) else \
            getattr(pre_quantized, "quant_method", "?")
        errs.append(FieldError("distributed.deepspeed", f"{recipe.model.name_or_path} is a pre-quantized checkpoint "
                               f"({method}); ZeRO-3 cannot partition its packed weights: use zero2, or the "
                               "full-precision checkpoint with quantization.mode=4bit"))
    runtime = runtime_for(recipe, family)
    if q.mode == "4bit" and stage == 3 and getattr(torch, q.compute_dtype) != runtime.dtype:
        errs.append(FieldError("quantization.compute_dtype", f"must equal the model dtype "
                               f"({str(runtime.dtype).removeprefix('torch.')}) under ZeRO-3: the 4-bit weights are "
                               "stored in the compute dtype (bnb_4bit_quant_storage) so that DeepSpeed can "
                               "partition them with every other weight"))
    world = world_size() if under_launcher() else processes_per_node(recipe) * d.num_nodes
    t = recipe.train
    values = deepspeed_config.auto_values(
        world_size=world, micro_batch=t.per_device_train_batch_size, grad_accum=t.gradient_accumulation_steps,
        max_grad_norm=t.max_grad_norm, bf16=runtime.dtype == torch.bfloat16 and runtime.device == "cuda",
        fp16=runtime.dtype == torch.float16 and runtime.device == "cuda", learning_rate=t.learning_rate,
        weight_decay=t.weight_decay, hidden_size=deepspeed_config.hidden_size_of(model_config))
    problems = deepspeed_config.mismatches(config, values)
    problems += deepspeed_config.validate(deepspeed_config.fill_autos(config, values), world_size=world)
    errs.extend(FieldError("distributed.deepspeed", p) for p in problems)
    return errs


# ------------------------------------------------------------------ ZeRO-3: the vision tower in step
def dummy_vision_inputs(family, processor) -> dict[str, torch.Tensor]:
    """Vision inputs for one small blank image, as the family makes them (`Family.dummy_vision_inputs`)."""
    return dict(family.dummy_vision_inputs(family, processor))


def _float_sum(obj) -> torch.Tensor | None:
    """Sum of every floating-point tensor in a model output (tensor, tuple/list, mapping or ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        return obj.float().sum() if obj.is_floating_point() else None
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        total = None
        for item in obj:
            s = _float_sum(item)
            if s is not None:
                total = s if total is None else total + s
        return total
    return None


class VisionInStep:
    """Keeps every rank's vision tower calls in step under ZeRO-3.

    The model embeds the tokens, runs the vision tower when the batch has images, then the language model.
    ZeRO-3 gathers each module's weights collectively as the module runs, so ranks must run the same
    modules in the same order. On a batch without images, a hook right before the language model runs
    the vision tower on a dummy image and adds its output, times zero, to the input embeddings: the same
    order of gathers forward, and the same backward path (zero gradients for a trained tower/projector).
    """

    def __init__(self, model, family, processor):
        self.model = model
        self.family = family
        params = inspect.signature(model.get_image_features).parameters
        self.inputs = {k: v for k, v in dummy_vision_inputs(family, processor).items() if k in params}
        if "pixel_values" not in self.inputs:
            raise VlmtuneError("cannot build a dummy image input for this model: its image processor made no "
                               "pixel_values")
        try:
            language = model.get_submodule(family.language_prefix)
        except AttributeError:
            raise VlmtuneError(f"the model has no {family.language_prefix} module (family {family.name})") from None
        self.calls = 0  # forwards that ran the dummy image (for tests and logs)
        self._has_images: bool | None = None
        self.handles = [model.register_forward_pre_hook(self._on_model, with_kwargs=True),
                        language.register_forward_pre_hook(self._on_language_model, with_kwargs=True),
                        model.register_forward_hook(self._done)]

    def _dtype(self) -> torch.dtype:
        try:
            tower = self.model.get_submodule(self.family.vision_prefix)
            return next(p.dtype for p in tower.parameters() if p.is_floating_point())
        except (AttributeError, StopIteration):
            return torch.float32

    def _on_model(self, module, args, kwargs):
        self._has_images = kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None
        return None

    def _on_language_model(self, module, args, kwargs):
        has_images, self._has_images = self._has_images, None  # once per model forward
        if has_images is not False:
            return None
        embeds = kwargs.get("inputs_embeds")
        if not isinstance(embeds, torch.Tensor):
            raise VlmtuneError("the language model was called without inputs_embeds; the dummy image forward "
                               "that keeps ZeRO-3 ranks in step has nowhere to go")
        dtype = self._dtype()
        inputs = {k: v.to(device=embeds.device, dtype=dtype if v.is_floating_point() else v.dtype)
                  for k, v in self.inputs.items()}
        out = self.model.get_image_features(**inputs, return_dict=True)
        # only what the model itself feeds on (the projected features): each extra output of the tower would
        # add one more backward pass through it, and ZeRO-3 checks that every rank ran the same modules
        features = getattr(out, "pooler_output", None)
        total = _float_sum(features if features is not None else out)
        self.calls += 1
        if total is not None:
            kwargs["inputs_embeds"] = embeds + (total * 0.0).to(embeds.dtype)
        return args, kwargs

    def _done(self, module, args, output):
        self._has_images = None
        return None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def keep_vision_in_step(model, family, processor) -> VisionInStep:
    """Install VisionInStep on the HF model inside a (PEFT-wrapped) model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return VisionInStep(base, family, processor)


# ------------------------------------------------------------------ ZeRO-3: saving the adapter
def is_partitioned(param) -> bool:
    return hasattr(param, "ds_id")


def gathered_adapter_state(model) -> dict[str, torch.Tensor] | None:
    """The adapter's full weights (state-dict names) gathered from every ZeRO-3 rank, or None if not partitioned.

    Collective under ZeRO-3: every rank must call it.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or "lora_" in n]
    if not any(is_partitioned(p) for _, p in named):
        return None
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for _, p in named if is_partitioned(p)], modifier_rank=None):
        state = {n: p.detach().clone().cpu() for n, p in named}
    empty = [n for n, t in state.items() if t.numel() == 0]
    if empty:
        raise VlmtuneError(f"gathering the adapter under ZeRO-3 left {len(empty)} empty tensors (e.g. {empty[0]})")
    return state
