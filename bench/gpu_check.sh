#!/bin/bash
# GPU check (issue 10 and the owed ones): on the Qwen2-VL-2B architecture (random bf16 weights), TRL's SFTTrainer
# VLM recipe beside vlmtune and vlmtune-fast, 2 epochs on the spread data (1-3 images up to 448 px, questions
# of 16-1,000 tokens), first bf16 LoRA, then 4-bit QLoRA, MFU printed; then the merge-adapter check and the
# DeepSpeed check. Budget: under 8 minutes in all on one H100/H200 (each step's timeout is cut to what is left).
#
# Run from the repository root on the GPU machine. Before that, on the CPU machine, fetch the wheels the GPU
# machine lacks into ./.whl (see ../shared/device/fetch-wheels.sh; 5.24.0 matches the CPU venv):
#     TRANSFORMERS=5.24.0 bash ../shared/device/fetch-wheels.sh
# and carry .whl along:  bash bench/gpu_check.sh
#
# Results: $OUT/<name>.json when $OUT is set (the device runner collects it), else bench/results/<name>.json;
# logs next to them (logs/). Knobs: BENCH_WORK (model/data/run folder, default /tmp/vlmtune-bench),
# BENCH_SAMPLES (default 32), BENCH_EPOCHS (default 2), BENCH_BUDGET (seconds in all, default 470), PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
t_start=$(date +%s)
BUDGET=${BENCH_BUDGET:-470}

. bench/device_env.sh
PY=${PYTHON:-python3}
RESULTS=${OUT:-bench/results}
WORK=${BENCH_WORK:-/tmp/vlmtune-bench}
mkdir -p "$RESULTS/logs" "$WORK"

# seconds for the next step: at most $1, and never more than what is left of the budget
left() {
  local rest=$(( BUDGET - ($(date +%s) - t_start) ))
  (( rest < 1 )) && rest=1
  (( rest < $1 )) && echo "$rest" || echo "$1"
}

nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv 2>/dev/null || true
$PY - <<'PYEOF' || exit 1
import importlib
for name in ("torch", "torchvision", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes",
             "deepspeed", "vlmtune"):
    try:
        print(f"{name:13s}", getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:
        print(f"{name:13s} NOT IMPORTABLE: {e.__class__.__name__}: {e}")
        if name not in ("bitsandbytes", "deepspeed"):
            raise SystemExit(1)
import torch
assert torch.cuda.is_available(), "no CUDA device"
print("device       ", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**20, "MiB")
PYEOF

common=(--arch qwen2-vl-2b --image-size 448 --batch-size 8 --num-samples "${BENCH_SAMPLES:-32}"
        --epochs "${BENCH_EPOCHS:-2}" --work-dir "$WORK" --arm-timeout 110)

# bf16 LoRA (also builds the model folder and the data, ~1 min; the 4-bit run reuses both)
timeout "$(left 180)" $PY bench/train_throughput.py "${common[@]}" --quant none \
    --name "qwen2-vl-2b bf16 LoRA r16, spread data, batch 8" --out "$RESULTS/gpu-qwen2-vl-2b-bf16-lora.json"
rc_bf16=$?
# 4-bit QLoRA (nf4, double quant, bf16 compute; vision tower and lm_head not quantized)
timeout "$(left 140)" $PY bench/train_throughput.py "${common[@]}" --quant 4bit \
    --name "qwen2-vl-2b 4-bit QLoRA r16, spread data, batch 8" --out "$RESULTS/gpu-qwen2-vl-2b-4bit-qlora.json"
rc_4bit=$?
for log in "$WORK"/prepare.log "$WORK"/runs/*/*/arm.log; do
  [ -f "$log" ] || continue
  rel=${log#"$WORK"/}
  tail -c 200000 "$log" > "$RESULTS/logs/${rel//\//__}"
done
$PY bench/summarize.py "$RESULTS"/gpu-qwen2-vl-2b-*.json || true

# merge-adapter: LoRA and QLoRA adapters trained 5 steps, merged with the parity check
rc_merge=skipped
t=$(left 100)
if (( t >= 40 )); then
  PYTHONUNBUFFERED=1 timeout "$t" $PY bench/gpu_merge_check.py --out "$RESULTS/gpu-merge-qwen2-vl-2b.json" \
      > "$RESULTS/logs/merge.log" 2>&1
  rc_merge=$?
  tail -n 30 "$RESULTS/logs/merge.log"
fi
# DeepSpeed ZeRO through `vlmtune sft` (its own script; what is left of the budget)
rc_ds=skipped
t=$(left 200)
if (( t >= 60 )); then
  BENCH_WORK="$WORK" timeout "$t" bash tests/gpu_deepspeed_check.sh > "$RESULTS/logs/deepspeed.log" 2>&1
  rc_ds=$?
  tail -n 30 "$RESULTS/logs/deepspeed.log"
fi

echo "bf16 rc=$rc_bf16, 4bit rc=$rc_4bit, merge rc=$rc_merge, deepspeed rc=$rc_ds," \
     "$(( $(date +%s) - t_start ))s in all; results in $RESULTS"
[ "$rc_bf16" -eq 0 ] && [ "$rc_4bit" -eq 0 ] && [ "$rc_merge" = 0 ] && [ "$rc_ds" = 0 ]
