#!/usr/bin/env bash
# The GPU path, checked: `smoke` on the CPU, on CUDA and under FSDP2, `tiny` on CUDA (every KD
# method, so on-policy sampling on the GPU), their AUC tables compared within a tolerance
# (other hardware trains other weights: same seed, other float reductions), then scoring and
# sampling throughput on the GPU. Under 8 minutes on one GPU.
#
#   bash benchmarks/perf/gpu_check.sh            # OUT=/tmp/kdaudit-gpu-check by default
#
# Tolerances: smoke 0.08 (its 200 vs 200 records: seeds 0 and 1 on the CPU differ by up to
# 0.065), tiny 0.05 against the CPU table in benchmarks/perf/tiny_cpu_auc.csv (seed 0, this
# commit's recipes, 1,000 vs 1,000 records).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/kdaudit-gpu-check}
PY=${PY:-.venv/bin/python}
KDAUDIT=${KDAUDIT:-.venv/bin/kdaudit}
export HF_HUB_OFFLINE=1 KDAUDIT_CACHE=${KDAUDIT_CACHE:-$OUT/cache}
mkdir -p "$OUT"

$PY - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: this script checks the GPU path"
print(f"CUDA device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
PY

# run a command with its output in LOG; print its seconds, or all of LOG when it fails
timed() {
    local log=$1; shift
    local t0=$SECONDS
    if ! "$@" > "$log" 2>&1; then cat "$log" >&2; echo "failed: $*" >&2; exit 1; fi
    echo $((SECONDS - t0))
}

echo "== smoke on the CPU"
t_cpu=$(timed "$OUT/smoke_cpu.log" env CUDA_VISIBLE_DEVICES= KDAUDIT_DEVICE=cpu \
        $KDAUDIT run --preset smoke --out "$OUT/cpu")
echo "== smoke on CUDA"
t_gpu=$(timed "$OUT/smoke_cuda.log" $KDAUDIT run --preset smoke --out "$OUT/cuda")
echo "smoke: CPU ${t_cpu} s, CUDA ${t_gpu} s"
$PY tools/compare_auc.py "$OUT/cpu/smoke" "$OUT/cuda/smoke" --tolerance 0.08

echo "== smoke under FSDP2 on CUDA (benchmarks/accelerate/fsdp_gpus.yaml, one process)"
t_fsdp=$(timed "$OUT/smoke_fsdp.log" $PY -m accelerate.commands.launch \
         --config_file benchmarks/accelerate/fsdp_gpus.yaml --num_processes 1 \
         -m kdaudit run --preset smoke --out "$OUT/fsdp")
echo "smoke under FSDP2: ${t_fsdp} s"
$PY tools/compare_auc.py "$OUT/cpu/smoke" "$OUT/fsdp/smoke" --tolerance 0.08

echo "== tiny on CUDA"
t_tiny=$(timed "$OUT/tiny_cuda.log" $KDAUDIT run --preset tiny --out "$OUT/cuda")
echo "tiny: CUDA ${t_tiny} s"
$PY tools/compare_auc.py benchmarks/perf/tiny_cpu_auc.csv "$OUT/cuda/tiny" --tolerance 0.05

echo "== throughput on CUDA"
$PY benchmarks/perf/bench_scoring.py --records 2000 --batch-size 128
$PY benchmarks/perf/bench_sampling.py --prompts 256 --new-tokens 64
