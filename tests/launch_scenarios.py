"""One 2-process launch for several runs of a test module (torchrun and the imports of torch, transformers and
DeepSpeed paid once): tests/ds_worker.py runs the scenarios in order in each process, and the module's fixture
hands each test its scenario's Result.

Only the scenarios of the selected tests run: each test names the ones it asserts on with
`@pytest.mark.scenario(name, ...)` (on a `pytest.param` for parametrized tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROCESS_GROUP = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Scenario:
    name: str
    argv: list[str]  # vlmtune's arguments: ["sft", recipe.yaml, *overrides]; every one asks for 2 processes
    out: Path  # the run's output folder
    env: dict = field(default_factory=dict)
    cache: str | None = None  # scenarios of one cache name share a $VLMTUNE_CACHE; default: a fresh one each


@dataclass
class Result:
    returncode: int  # the run's exit status on its ranks (the launch's when a rank did not finish it)
    stdout: str  # both ranks' output during this run (with the launch's, for a run cut short)
    stderr: str
    launch_stderr: str  # the launch's own: vlmtune's re-launch under torchrun, torchrun's
    out: Path
    probe: Path
    ranks: list[dict]  # the probes' rank<N>.json (tests/ds_worker.py)


def selected(request, order: list[str]) -> list[str]:
    """The scenarios named by the selected tests of the requesting module, in `order`."""
    names = {name for item in request.session.items if getattr(item, "module", None) is request.module
             for mark in item.iter_markers("scenario") for name in mark.args}
    unknown = names - set(order)
    assert not unknown, f"{request.module.__name__}: scenario marks {sorted(unknown)} name no scenario of {order}"
    return [n for n in order if n in names]


def fresh_cache(folder: Path) -> Path:
    """An empty $VLMTUNE_CACHE that shares the session's tiny models."""
    folder.mkdir(parents=True)
    (folder / "builtin").symlink_to(Path(os.environ["VLMTUNE_CACHE"]) / "builtin", target_is_directory=True)
    return folder


def launch(folder: Path, scenarios: list[Scenario], timeout: int) -> dict[str, Result]:
    """Run `scenarios` in one launch (the first one's command starts it); {} when none is selected.

    A run that fails ends the launch (its process group may be out of step): put the one expected to fail last."""
    if not scenarios:
        return {}
    from vlmtune.demo import builtin_model_path

    builtin_model_path("tiny-qwen2-vl")  # built once here, not by two ranks at once
    caches: dict[str, Path] = {}
    spec = []
    for s in scenarios:
        key = s.cache or s.name
        if key not in caches:
            caches[key] = fresh_cache(folder / "caches" / key)
        spec.append({"name": s.name, "argv": s.argv, "logs": str(folder / "logs" / s.name),
                     "probe": str(folder / "probes" / s.name),
                     "env": {"VLMTUNE_CACHE": str(caches[key]), **s.env}})
    path = folder / "scenarios.json"
    path.with_suffix(".tmp").write_text(json.dumps(spec, indent=1))
    path.with_suffix(".tmp").replace(path)
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", VLMTUNE_PROBE_SEQUENTIAL="1", **spec[0]["env"],
               VLMTUNE_PROBE_SCENARIOS=str(path))
    cmd = [sys.executable, str(ROOT / "tests" / "ds_worker.py"), *scenarios[0].argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return {s.name: _result(s, entry, proc) for s, entry in zip(scenarios, spec, strict=True)}


def _result(scenario: Scenario, entry: dict, proc) -> Result:
    logs, probe = Path(entry["logs"]), Path(entry["probe"])
    codes = [int(p.read_text()) for p in sorted(logs.glob("rank*.exit"))] if logs.is_dir() else []
    finished = len(codes) == 2
    code = max(codes, key=abs) if finished else (proc.returncode or -1)

    def read(suffix: str) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(logs.glob(f"rank*.{suffix}"))) \
            if logs.is_dir() else ""

    stdout, stderr = read("out"), read("err")
    if not finished:  # why the launch ended
        stdout, stderr = proc.stdout + stdout, proc.stderr + stderr
    ranks = [json.loads(p.read_text()) for p in sorted(probe.glob("rank*.json"))] if probe.is_dir() else []
    return Result(code, stdout, stderr, proc.stderr, scenario.out, probe, ranks)


def run_one(folder: Path, argv: list[str], timeout: int = 240) -> Result:
    """`argv` in one process seen as launched (a one-member group, so that the probes record it), with a fresh
    $VLMTUNE_CACHE: the single-process reference of a 2-process run."""
    from vlmtune.demo import builtin_model_path
    from vlmtune.distributed import free_port

    builtin_model_path("tiny-qwen2-vl")
    probe = folder / "probe"
    env = dict(os.environ, VLMTUNE_PROBE_DIR=str(probe), VLMTUNE_PROBE_SEQUENTIAL="1", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), VLMTUNE_CACHE=str(fresh_cache(folder / "cache")))
    cmd = [sys.executable, str(ROOT / "tests" / "ds_worker.py"), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    ranks = [json.loads(p.read_text()) for p in sorted(probe.glob("rank*.json"))] if probe.is_dir() else []
    return Result(proc.returncode, proc.stdout, proc.stderr, proc.stderr, folder / "out", probe, ranks)
