#!/bin/bash
# GPU check of issue 5 (DeepSpeed ZeRO through `vlmtune sft`) on the Qwen2-VL-2B architecture, every local GPU.
# Before, on the CPU machine (venv active; builds the deepspeed wheel with DS_BUILD_OPS=0):
#     TRANSFORMERS=5.24.0 bash ../shared/device/fetch-wheels.sh
# then on the GPU machine, from the repository root, with .whl carried along:
#     bash tests/gpu_deepspeed_check.sh          # writes $OUT/gpu-deepspeed-qwen2-vl-2b.json (or bench/results/)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
. bench/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || true
python3 -c "import deepspeed, torch; print('deepspeed', deepspeed.__version__, 'gpus', torch.cuda.device_count())" || exit 1
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
python3 tests/gpu_deepspeed_check.py --arch qwen2-vl-2b --steps "${DS_STEPS:-6}" --batch-size 8 --image-size 448 \
    --num-samples 64 --run-timeout 150 --out "$RESULTS/gpu-deepspeed-qwen2-vl-2b.json" "$@"
rc=$?
mkdir -p "$RESULTS/logs"
for log in "${BENCH_WORK:-/tmp/vlmtune-bench}"/ds-runs/*/run.log; do
  [ -f "$log" ] && cp "$log" "$RESULTS/logs/deepspeed-$(basename "$(dirname "$log")").log"
done
exit $rc
