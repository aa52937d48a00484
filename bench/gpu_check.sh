#!/bin/bash
# GPU check: Qwen2-VL-2B architecture (random bf16 weights), 448 px images, batch 8, TRL's SFTTrainer VLM recipe
# beside vlmtune, first bf16 LoRA, then 4-bit QLoRA. Budget: about 8 minutes in all on one H100.
#
# Run from the repository root on the GPU machine. Before that, on the CPU machine, fetch the wheels the GPU
# machine lacks into ./.whl (see ../shared/device/fetch-wheels.sh; 5.24.0 matches the CPU venv):
#     TRANSFORMERS=5.24.0 bash ../shared/device/fetch-wheels.sh
# and carry .whl along:  bash bench/gpu_check.sh
#
# Results: $OUT/<name>.json when $OUT is set (the device runner collects it), else bench/results/<name>.json;
# arm logs are copied next to them (logs/). Environment knobs: BENCH_WORK (model/data/run folder, default
# /tmp/vlmtune-bench), BENCH_STEPS (measured steps, default 10), BENCH_WARMUP (default 3), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
t_start=$(date +%s)

. bench/device_env.sh
PY=${PYTHON:-python3}
RESULTS=${OUT:-bench/results}
WORK=${BENCH_WORK:-/tmp/vlmtune-bench}
mkdir -p "$RESULTS" "$WORK"

nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv 2>/dev/null || true
$PY - <<'EOF' || exit 1
import importlib
for name in ("torch", "torchvision", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "vlmtune"):
    try:
        print(f"{name:13s}", getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:
        print(f"{name:13s} NOT IMPORTABLE: {e.__class__.__name__}: {e}")
        if name != "bitsandbytes":
            raise SystemExit(1)
import torch
assert torch.cuda.is_available(), "no CUDA device"
print("device       ", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**20, "MiB")
EOF

common=(--arch qwen2-vl-2b --image-size 448 --batch-size 8 --num-samples 64
        --steps "${BENCH_STEPS:-10}" --warmup-steps "${BENCH_WARMUP:-3}" --gradient-checkpointing on
        --work-dir "$WORK" --arm-timeout 150)

# bf16 LoRA (also builds the model folder and the data, ~1 min; the 4-bit run reuses both)
timeout 330 $PY bench/train_throughput.py "${common[@]}" --quant none \
    --name "qwen2-vl-2b bf16 LoRA r16, 448px, batch 8" --out "$RESULTS/gpu-qwen2-vl-2b-bf16-lora.json"
rc_bf16=$?
# 4-bit QLoRA (nf4, double quant, bf16 compute; vision tower and lm_head not quantized)
timeout 240 $PY bench/train_throughput.py "${common[@]}" --quant 4bit \
    --name "qwen2-vl-2b 4-bit QLoRA r16, 448px, batch 8" --out "$RESULTS/gpu-qwen2-vl-2b-4bit-qlora.json"
rc_4bit=$?

mkdir -p "$RESULTS/logs"
for log in "$WORK"/prepare.log "$WORK"/runs/*/*/arm.log; do
  [ -f "$log" ] || continue
  rel=${log#"$WORK"/}
  tail -c 200000 "$log" > "$RESULTS/logs/${rel//\//__}"
done
echo "bf16 rc=$rc_bf16, 4bit rc=$rc_4bit, $(( $(date +%s) - t_start ))s in all; results in $RESULTS"
[ "$rc_bf16" -eq 0 ] && [ "$rc_4bit" -eq 0 ]
