"""Where this process stands (started by a launcher? its rank, the world size) and the re-launch of `vlmtune sft`
under torchrun, the deepspeed launcher or `accelerate launch` when more than one process is asked for.

A process already started by one of them (RANK / LOCAL_RANK / WORLD_SIZE in the environment) is never
re-launched."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import torch

from ..config import Recipe
from ..errors import VlmtuneError

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


def planned_world_size(recipe: Recipe) -> int:
    """How many processes the run has: this process group's size under a launcher, else as many as
    `vlmtune sft` will launch."""
    if under_launcher():
        return world_size()
    return processes_per_node(recipe) * recipe.distributed.num_nodes


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
    package = Path(__file__).resolve().parents[1]  # vlmtune/
    return None if package in path.resolve().parents else str(path.resolve())


def relaunch(recipe: Recipe, cli_args: list[str], entry: str | None = None, log=print) -> int:
    """Run the launcher (it starts every process of this node) and return its exit status."""
    cmd = launch_command(recipe, cli_args, entry)
    log("launching: " + " ".join(shlex.quote(c) for c in cmd))
    try:
        return subprocess.run(cmd, check=False).returncode
    except FileNotFoundError as e:
        raise VlmtuneError(f"cannot start the launcher: {e}") from None


def process_group_env(recipe: Recipe) -> dict[str, str]:
    """The environment of a one-member process group, for a single DeepSpeed process outside any launcher
    (DeepSpeed and Accelerate read the group from RANK, WORLD_SIZE, MASTER_ADDR ...); {} under a launcher."""
    if under_launcher():
        return {}
    d = recipe.distributed
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": d.master_addr or "127.0.0.1",
            "MASTER_PORT": str(d.master_port or free_port())}
