"""The rest of the fast path: gradient checkpointing decided from a measured step, Liger's kernels chosen or refused
with the reason (a fake liger-kernel stands in on a CPU), DataLoader and thread sizes from the CPUs available."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from dataclasses import replace

import pytest
import torch

import vlmtune
import vlmtune.training
from vlmtune import families, liger, loader_sizing, memory_probe
from vlmtune.config import RecipeError, load_recipe
from vlmtune.distributed import process
from vlmtune.errors import PreflightError, VlmtuneError
from vlmtune.memory_probe import GIB

from .run_fixtures import quiet, recipe_at, write_train_data

WITH_LIGER = [f.name for f in families.all_families() if f.liger is not None]


def _recipe(**fields):
    base = {"model.name_or_path": "builtin:tiny-qwen2-vl", "data.train": "x.jsonl"}
    return load_recipe(None, overrides={**base, **fields}, check_paths=False)


# ------------------------------------------------------------------ recipe fields


@pytest.mark.parametrize("field", ["train.gradient_checkpointing", "train.liger_kernel"])
def test_switches_take_auto_true_false_and_yaml_booleans(field):
    section, key = field.split(".")
    assert getattr(getattr(_recipe(), section), key) == "auto"
    for given, word in ((True, "true"), (False, "false"), ("true", "true"), ("auto", "auto")):
        assert getattr(getattr(_recipe(**{field: given}), section), key) == word
    with pytest.raises(RecipeError, match=rf"{field}: must be one of auto, true, false, got 'sometimes'"):
        _recipe(**{field: "sometimes"})


def test_old_boolean_recipes_keep_their_meaning():
    assert fixed(_recipe(**{"train.gradient_checkpointing": True})) == (True, "train.gradient_checkpointing: true")
    assert fixed(_recipe(**{"train.gradient_checkpointing": False})) == (False, "train.gradient_checkpointing: false")


def test_prefetch_factor_needs_workers():
    with pytest.raises(RecipeError, match=r"data.prefetch_factor: needs DataLoader workers"):
        _recipe(**{"data.prefetch_factor": 4, "data.num_workers": 0})
    with pytest.raises(RecipeError, match=r"data.prefetch_factor: must be a positive integer, got 0"):
        _recipe(**{"data.prefetch_factor": 0})
    assert _recipe(**{"data.prefetch_factor": 4, "data.num_workers": 2}).data.prefetch_factor == 4


# ------------------------------------------------------------------ gradient checkpointing


def fixed(recipe, deepspeed=False, zero_stage=0):
    c = memory_probe.fixed_choice(recipe.train.gradient_checkpointing, deepspeed, zero_stage,
                                  recipe.quantization.mode != "none")
    return None if c is None else (c.enabled, c.reason)


def test_auto_measures_except_where_measuring_is_not_safe():
    auto = _recipe()
    assert fixed(auto) is None  # measured
    on, why = fixed(auto, deepspeed=True, zero_stage=3)
    assert on and "ZeRO-3" in why and "partitioned" in why
    on, why = fixed(auto, deepspeed=True, zero_stage=2)
    assert on and "DeepSpeed" in why
    on, why = fixed(_recipe(**{"quantization.mode": "4bit"}))
    assert on and "quantization" in why
    assert fixed(_recipe(**{"quantization.mode": "4bit", "train.gradient_checkpointing": False}))[0] is False


@pytest.mark.parametrize(("peak", "room", "enabled"), [(1 * GIB, 10 * GIB, False), (8 * GIB, 10 * GIB, True),
                                                       (None, 10 * GIB, True)])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_checkpointing_turns_on_only_when_the_measured_step_would_not_fit(monkeypatch, device, peak, room, enabled):
    """The measured peak plus Adam's state against the device's share of the room (None: out of memory)."""
    ran = []
    measure = lambda step: (step(), (peak, room, {"probe": 1}))[1]  # noqa: E731
    monkeypatch.setattr(memory_probe, "_cuda_peak" if device == "cuda" else "_cpu_peak", measure)
    choice = memory_probe.measured_choice(lambda: ran.append(1), device, trainable=1000)
    assert ran == [1] and choice.enabled is enabled
    assert choice.figures["measured_on"] == device and choice.figures["probe"] == 1
    if peak is None:
        assert "ran out of memory" in choice.reason
    else:
        share = memory_probe.GPU_SHARE if device == "cuda" else memory_probe.CPU_SHARE
        assert choice.figures["budget_gib"] == round(share * room / GIB, 3)
        assert ("exceeds" if enabled else "fits in") in choice.reason


def test_optimizer_state_counts_against_the_budget(monkeypatch):
    monkeypatch.setattr(memory_probe, "_cpu_peak", lambda step: (1 * GIB, 10 * GIB, {}))
    assert not memory_probe.measured_choice(lambda: None, "cpu", trainable=0).enabled
    assert memory_probe.measured_choice(lambda: None, "cpu", trainable=GIB // 8 * 7).enabled  # + 7 GiB of Adam


def test_the_cpu_measurement_sees_the_step_memory():
    def step():
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        block += 1
        del block

    growth, available, figures = memory_probe._cpu_peak(step)
    assert 60 * 2**20 <= growth < 200 * 2**20, growth
    assert available > 0 and figures["peak_from"] == "VmHWM"


def test_available_ram_without_psutil_reads_meminfo(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)
    monkeypatch.setattr(memory_probe, "_read", lambda path: {"/proc/meminfo": "MemAvailable:  2048 kB\n",
                                                             "/sys/fs/cgroup/memory.max": "1048576\n",
                                                             "/sys/fs/cgroup/memory.current": "24576\n"}.get(path, ""))
    assert memory_probe.available_ram() == 1048576 - 24576  # the cgroup's limit is lower than MemAvailable
    monkeypatch.setattr(memory_probe, "_read", lambda path: "MemAvailable:  2048 kB\n" if "meminfo" in path else "max")
    assert memory_probe.available_ram() == 2048 * 1024


def test_the_longest_batch_is_measured():
    assert memory_probe.longest_batch([5, 9, 1, 9, 7], 2) == [1, 3]
    assert memory_probe.longest_batch([5, 9], 4) == [0, 1]


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_auto_off_trains_exactly_as_false_and_is_recorded(tmp_path, monkeypatch):
    """The probe step leaves no gradient, random state or metric behind: the losses equal a run without it."""
    runs = {}
    real = vlmtune.training.build_trainer

    def keep(plan, folder, log=print):
        trainer, report = real(plan, folder, log)
        runs[switch_of(plan)] = trainer
        return trainer, report

    switch_of = lambda plan: plan.recipe.train.gradient_checkpointing  # noqa: E731
    monkeypatch.setattr(vlmtune.training, "build_trainer", keep)
    data = write_train_data(tmp_path, 8)
    out = {}
    for value in ("false", "auto"):
        recipe = recipe_at(tmp_path / value, data, **{"train.gradient_checkpointing": value, "lora.dropout": 0.1})
        out[value] = vlmtune.train(recipe, log=quiet)
    assert _losses(runs["auto"]) == _losses(runs["false"]) and len(_losses(runs["auto"])) == 2
    saved = json.loads((out["auto"].output_dir / "train_results.json").read_text())["fast_path"]
    meta = json.loads((out["auto"].output_dir / "vlmtune.json").read_text())["fast_path"]
    assert saved == meta and saved["gradient_checkpointing"]["enabled"] is False
    assert saved["gradient_checkpointing"]["measured_on"] == "cpu" and "fits in" in saved["gradient_checkpointing"]["reason"]
    assert "Liger kernels: off" in saved["liger_kernel"] and "torch thread" in saved["data_loading"]
    assert not runs["auto"].args.gradient_checkpointing


def test_auto_turns_checkpointing_on_when_the_step_does_not_fit(tmp_path, monkeypatch):
    """With almost no RAM left, auto checkpoints: the model recomputes its layers, and the losses stay the same."""
    data = write_train_data(tmp_path, 8)
    built = {}
    real = vlmtune.training.build_trainer

    def keep(plan, folder, log=print):
        built[plan.recipe.train.gradient_checkpointing] = trainer = real(plan, folder, log)[0]
        return trainer, {}

    monkeypatch.setattr(vlmtune.training, "build_trainer", keep)
    vlmtune.train(recipe_at(tmp_path / "off", data, **{"train.gradient_checkpointing": "false"}), log=quiet)
    monkeypatch.setattr(memory_probe, "available_ram", lambda: 2**20)
    result = vlmtune.train(recipe_at(tmp_path / "auto", data, **{"train.gradient_checkpointing": "auto"}), log=quiet)
    trainer = built["auto"]
    assert trainer.args.gradient_checkpointing and trainer.model.base_model.model.is_gradient_checkpointing
    record = json.loads((result.output_dir / "train_results.json").read_text())["fast_path"]["gradient_checkpointing"]
    assert record["enabled"] is True and "exceeds" in record["reason"]
    assert _losses(trainer) == pytest.approx(_losses(built["false"]), rel=1e-5)


# ------------------------------------------------------------------ Liger


def _fake_liger(monkeypatch, failing: str = "") -> list:
    """A stand-in liger-kernel: every apply function the families name records its call; `failing`: a liger module
    whose import raises the ImportError liger 0.8.5 raised on Qwen2-VL with transformers 5.23."""
    calls = []

    def apply(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True, swiglu=True,
              layer_norm=True, geglu=True, model=None):
        calls.append({"model": model, "lora": _has_lora(model), "rope": rope, "cross_entropy": cross_entropy, "rms_norm": rms_norm,
                      "fused_linear_cross_entropy": fused_linear_cross_entropy, "swiglu": swiglu,
                      "layer_norm": layer_norm, "geglu": geglu})

    def forwarding(cross_entropy=False, fused_linear_cross_entropy=True, model=None, **kwargs):  # LLaVA's kind
        calls.append({"model": model, "cross_entropy": cross_entropy,
                      "fused_linear_cross_entropy": fused_linear_cross_entropy, **kwargs})

    top = _module("liger_kernel")
    api = _module("liger_kernel.transformers")
    for f in families.all_families():
        if f.liger:
            setattr(api, f.liger.function, forwarding if "llava" in f.liger.function else apply)
            for name in f.liger.imports:
                monkeypatch.setitem(sys.modules, name, _module(name))
    monkeypatch.setitem(sys.modules, "liger_kernel", top)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", api)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.model", _module("liger_kernel.transformers.model"))
    if failing:
        monkeypatch.delitem(sys.modules, failing)

        class Broken:
            @staticmethod
            def find_spec(name, path=None, target=None):
                if name == failing:
                    raise ImportError("cannot import name 'LigerQwen2VLCausalLMOutputWithPast' from "
                                      "'liger_kernel.transformers.model.output_classes'")
                return None

        monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    return calls


def _has_lora(model) -> str:
    return "with LoRA" if any("lora_" in n for n, _ in model.named_parameters()) else "without LoRA"


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__path__ = []  # a package: its submodules are looked up (and found in sys.modules)
    return module


@pytest.mark.parametrize("family", families.names())
def test_liger_is_chosen_only_on_cuda_installed_and_supported(monkeypatch, family):
    f = families.get(family)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not installed
    assert liger.choose("auto", f, "cuda").reason.endswith("liger-kernel is not installed (pip install liger-kernel)")
    _fake_liger(monkeypatch)
    cpu = liger.choose("auto", f, "cpu")
    assert not cpu.use and cpu.problem is None and "no CUDA GPU" in cpu.reason
    refused = liger.choose("true", f, "cpu").problem
    assert str(refused) == ("train.liger_kernel: cannot be true: no CUDA GPU (Liger's kernels are Triton GPU "
                            "kernels); set it to auto or false")
    on = liger.choose("auto", f, "cuda")
    if f.liger is None:
        assert not on.use and f"liger-kernel has no patch for the {family} family" in on.reason
        assert "has no patch" in str(liger.choose("true", f, "cuda").problem)
    else:
        assert on.use and on.problem is None and f.liger.function in on.reason
    assert liger.choose("false", f, "cuda") == liger.LigerChoice(False, "train.liger_kernel: false")


def test_liger_that_fails_to_import_for_a_family_is_skipped_or_refused_with_the_reason(monkeypatch):
    qwen = families.get("qwen2_vl")
    _fake_liger(monkeypatch, failing=qwen.liger.imports[0])
    auto = liger.choose("auto", qwen, "cuda")
    assert not auto.use and auto.problem is None
    assert "cannot patch qwen2_vl with this transformers (ImportError: cannot import name " \
           "'LigerQwen2VLCausalLMOutputWithPast'" in auto.reason
    assert "set it to auto or false" in str(liger.choose("true", qwen, "cuda").problem)
    assert liger.choose("auto", families.get("llava"), "cuda").use  # other families are unaffected


def test_liger_true_on_a_cpu_is_refused_while_planning(tmp_path):
    data = write_train_data(tmp_path, 4)
    recipe = recipe_at(tmp_path / "out", data, **{"train.liger_kernel": True, "train.use_cpu": True})
    with pytest.raises(PreflightError, match=r"train.liger_kernel: cannot be true: no CUDA GPU"):
        vlmtune.plan(recipe)


@pytest.mark.parametrize("family", WITH_LIGER)
def test_liger_asks_each_family_for_its_kernels_and_never_the_fused_cross_entropy(monkeypatch, family):
    calls = _fake_liger(monkeypatch)
    model = torch.nn.Linear(2, 2)
    f = families.get(family)
    line = liger.apply(model, f, required=True)
    (call,) = calls
    assert call["model"] is model and call["fused_linear_cross_entropy"] is False and call["cross_entropy"] is False
    asked = {k for k, v in call.items() if v is True}
    assert asked == set(f.liger.kernels), asked
    assert line == f"Liger kernels: on ({', '.join(k for k in liger.KERNELS if k in f.liger.kernels)})"


def test_liger_failing_on_the_model_is_an_error_only_when_required(monkeypatch):
    _fake_liger(monkeypatch)
    f = families.get("qwen2_vl")

    def broken(**kwargs):
        raise TypeError("Unsupported Qwen2VL model type")

    monkeypatch.setattr(sys.modules["liger_kernel.transformers"], f.liger.function, broken)
    assert liger.apply(None, f, required=False) == ("Liger kernels: off (apply_liger_kernel_to_qwen2_vl failed on "
                                                   "this model (TypeError: Unsupported Qwen2VL model type))")
    with pytest.raises(VlmtuneError, match=r"train.liger_kernel: apply_liger_kernel_to_qwen2_vl failed"):
        liger.apply(None, f, required=True)


def test_training_patches_the_loaded_model_before_lora(tmp_path, monkeypatch):
    """With the plan's Liger choice on, the family's apply function gets the unwrapped model, before LoRA."""
    calls = _fake_liger(monkeypatch)
    data = write_train_data(tmp_path, 4)
    plan = vlmtune.plan(recipe_at(tmp_path / "out", data))
    plan.runtime = replace(plan.runtime, liger=True, liger_note="test")
    trainer, _ = vlmtune.training.build_trainer(plan, tmp_path / "ckpt", log=quiet)
    (call,) = calls
    assert type(call["model"]).__name__ == "Qwen2VLForConditionalGeneration"
    assert call["lora"] == "without LoRA" and _has_lora(trainer.model) == "with LoRA"
    assert trainer.fast_path["liger_kernel"] == "Liger kernels: on (rms_norm, swiglu, layer_norm)"


# ------------------------------------------------------------------ DataLoader and threads


@pytest.fixture
def cpus(monkeypatch):
    """Pretend the process may run on n CPUs, with no thread variables set."""
    for name in (*loader_sizing.THREAD_VARIABLES, "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)

    def set_cpus(n: int, machine: int = 64):
        monkeypatch.setattr(loader_sizing.os, "sched_getaffinity", lambda pid: set(range(n)))
        monkeypatch.setattr(loader_sizing.os, "cpu_count", lambda: machine)

    return set_cpus


@pytest.mark.parametrize(("n", "device", "processes", "workers", "threads", "prefetch"), [
    (2, "cpu", 1, 0, 2, None),  # the shared 2-core machine: compute gets both cores
    (16, "cpu", 1, 4, 12, 2),
    (16, "cuda", 1, 8, 8, 4),
    (16, "cuda", 4, 3, 1, 4),  # four ranks share the 16 CPUs
    (1, "cuda", 1, 0, 1, None),
])
def test_workers_and_threads_come_from_the_cpus_available(cpus, n, device, processes, workers, threads, prefetch):
    cpus(n)
    s = loader_sizing.size(None, None, device, processes, current_threads=64, default_threads=64)
    assert (s.cpus, s.workers, s.threads, s.prefetch_factor) == (n, workers, threads, prefetch)
    assert s.share == max(1, n // processes) and s.pin_memory is (device == "cuda")
    assert s.persistent_workers is (workers > 0)
    assert s.threads + s.workers <= max(s.share, 1 + s.workers)  # no more busy threads than the rank's cores


def test_the_affinity_mask_not_the_machine_counts(cpus):
    cpus(3, machine=96)
    assert loader_sizing.size(None, None, "cuda", 1).cpus == 3


def test_the_recipe_and_the_user_settings_win(cpus, monkeypatch):
    cpus(8)
    mine = loader_sizing.size(2, 6, "cpu", 1, current_threads=8, default_threads=8)
    assert (mine.workers, mine.prefetch_factor, mine.threads) == (2, 6, 6)
    assert loader_sizing.size(None, None, "cpu", 1, current_threads=3, default_threads=8).threads is None
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    kept = loader_sizing.size(None, None, "cpu", 1, current_threads=5, default_threads=5)
    assert kept.threads is None and "kept as set (OMP_NUM_THREADS=5)" in kept.note
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_sizing.local_processes(world_size=8, num_nodes=1) == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert loader_sizing.local_processes(world_size=8, num_nodes=2) == 4


def test_the_thread_count_is_set_in_the_one_process_step(cpus, monkeypatch):
    set_to = []
    monkeypatch.setattr(process.torch, "set_num_threads", set_to.append)
    monkeypatch.setattr(process.torch, "get_num_threads", lambda: 2)
    cpus(8)
    process.set_thread_counts(loader_sizing.size(None, None, "cpu", 1, 2, 2), log=quiet)
    assert set_to == [6]
    process.set_thread_counts(loader_sizing.size(None, None, "cpu", 1, 3, 2), log=quiet)  # the user's 3: kept
    assert set_to == [6]


def test_the_trainer_arguments_carry_the_sizes(tmp_path, cpus):
    from vlmtune.training import sft_config

    cpus(16)
    data = write_train_data(tmp_path, 4)
    plan = vlmtune.plan(recipe_at(tmp_path / "out", data, **{"data.num_workers": None}))
    args = sft_config(plan, tmp_path / "ckpt")
    assert (args.dataloader_num_workers, args.dataloader_prefetch_factor, args.dataloader_persistent_workers) == (
        4, 2, True)
    assert args.dataloader_pin_memory is False  # a CPU run


class _Threads(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.tensor([torch.get_num_threads(), i])


def _note_worker(worker_id: int) -> None:
    torch.set_num_threads(3)  # the Trainer's own init runs after the limit: it must still run


def test_workers_are_limited_and_keep_the_trainer_init():
    loader = torch.utils.data.DataLoader(_Threads(), batch_size=1, num_workers=1, worker_init_fn=_note_worker)
    limited = loader_sizing.limit_loader_threads(loader)
    assert limited.worker_init_fn.func is loader_sizing._limited_then
    assert loader_sizing.limit_loader_threads(limited).worker_init_fn.args == (_note_worker,)  # not wrapped twice
    threads = [int(b[0, 0]) for b in limited]
    assert threads == [3, 3]  # the Trainer's init ran after the limit


def test_threads_drop_to_the_idle_cores_when_other_work_holds_the_rest(cpus):
    """The 12x case: two busy cores elsewhere would stall every barrier of a 2-thread pool; 1 thread runs."""
    cpus(2)
    busy = loader_sizing.size(None, None, "cpu", 1, 2, 2, idle=0.4)
    assert busy.threads == 1 and "0.4 idle" in busy.note and "other work holds the other cores" in busy.note
    assert loader_sizing.size(None, None, "cpu", 1, 2, 2, idle=1.9).threads == 2
    cpus(16)
    assert loader_sizing.size(None, None, "cuda", 4, 2, 2, idle=6.0).threads == 1  # 1.5 idle per rank, 1 core left
    assert loader_sizing.size(None, None, "cpu", 1, 2, 2, idle=6.2).threads == 6
    assert loader_sizing.size(None, None, "cpu", 1, 3, 2, idle=0.0).threads is None  # the user's own count stays


def test_idle_cores_are_read_from_proc_stat_over_the_cpus_of_the_mask(cpus, monkeypatch):
    cpus(2)
    samples = iter([
        "cpu  0 0 0 0 0 0 0 0\ncpu0 100 0 0 100 0 0 0 0\ncpu1 100 0 0 100 0 0 0 0\ncpu2 0 0 0 0 0 0 0 0\n",
        "cpu  0 0 0 0 0 0 0 0\ncpu0 150 0 0 150 0 0 0 0\ncpu1 200 0 0 100 0 0 0 0\ncpu2 0 0 0 900 0 0 0 0\n",
    ])  # cpu0 half idle, cpu1 busy, cpu2 (idle) is outside the mask

    class Stat:
        def __init__(self, path):
            assert str(path) == "/proc/stat"

        def read_text(self):
            return next(samples)

    monkeypatch.setattr(loader_sizing, "Path", Stat)
    monkeypatch.setattr(loader_sizing.time, "sleep", lambda s: None)
    assert loader_sizing.idle_cpus() == pytest.approx(2 * 50 / 200)


def test_a_step_that_cannot_be_measured_leaves_checkpointing_on(monkeypatch):
    class Trainer:
        model = torch.nn.Linear(2, 2)
        args = types.SimpleNamespace(gradient_checkpointing=False, gradient_checkpointing_kwargs=None)

    def failing(trainer, batch):
        def step():
            raise RuntimeError("a shape the model refuses")
        return step

    monkeypatch.setattr(memory_probe, "probe_step", failing)
    trainer = Trainer()
    choice = memory_probe.measure_for(trainer, [{"x": 1}] * 3, [1, 2, 3], 2, "cpu", collator=lambda rows: rows)
    assert choice.enabled and "could not be measured (RuntimeError: a shape the model refuses); on" in choice.reason
    assert trainer.args.gradient_checkpointing is True
    assert trainer.args.gradient_checkpointing_kwargs == {"use_reentrant": False}
