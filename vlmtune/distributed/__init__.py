"""Multi-process runs: where this process stands and the re-launch (`launch`), the run's DeepSpeed config
(`deepspeed`: presets, `auto` filling, validation, once per run), the process-wide state DeepSpeed needs
(`process`: one explicit step), and the ZeRO-3 traps (`zero3`: the vision tower in step, the gathered adapter)."""

from .launch import (
    DEFAULT_PORT,
    LAUNCHER_ENV,
    entry_script,
    free_port,
    is_main_process,
    launch_command,
    launcher_for,
    needs_launch,
    planned_world_size,
    process_group_env,
    processes_per_node,
    rank,
    relaunch,
    under_launcher,
    world_size,
)
from .process import prepare_deepspeed_process
from .zero3 import (
    VisionInStep,
    dummy_vision_inputs,
    gathered_adapter_state,
    is_partitioned,
    keep_vision_in_step,
)

__all__ = ["DEFAULT_PORT", "LAUNCHER_ENV", "VisionInStep", "dummy_vision_inputs", "entry_script", "free_port",
           "gathered_adapter_state", "is_main_process", "is_partitioned", "keep_vision_in_step", "launch_command",
           "launcher_for", "needs_launch", "planned_world_size", "prepare_deepspeed_process", "process_group_env",
           "processes_per_node", "rank", "relaunch", "under_launcher", "world_size"]
