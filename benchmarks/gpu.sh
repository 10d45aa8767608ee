#!/usr/bin/env bash
# GPU checks, prepared for a machine with one CUDA device (about 3-4 minutes in all):
#   1. the tests marked `gpu` (skipped on machines without CUDA);
#   2. the throughput benchmark (bench_speed.py) on 10^5 simulated cells x 2,000 genes, scVI against CplMixVAE
#      (nb, two agents) at batch sizes 128 and 1,000, in float32 and in 16-bit mixed precision
#      (Lightning's precision="16-mixed", passed through model.train); PRECISION=bf16-mixed for bfloat16.
#   COMPILE=1 adds a run with plan_kwargs={"compile": True} (torch.compile; the first steps compile).
# Results: benchmarks/results/speed_gpu.{md,json} and speed_gpu_16mixed.{md,json} (and speed_gpu_compile).
#
#   bash benchmarks/gpu.sh                 # from the repository root or anywhere
#   PRECISION=bf16-mixed COMPILE=1 bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PRECISION="${PRECISION:-16-mixed}"
THREADS="${THREADS:-4}"
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" MPLBACKEND=Agg

python - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("benchmarks/gpu.sh needs a CUDA device; torch sees none.")
print("CUDA device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY

echo "== pytest -m gpu"
timeout 150 python -m pytest -q -p no:cacheprovider -m gpu

SPEED=(--accelerator gpu --n-cells 100000 --batch-sizes 128 1000 --likelihoods nb --steps 40 --epochs 2
       --repeats 1 --threads "$THREADS")
echo "== throughput, float32"
timeout 120 python benchmarks/bench_speed.py "${SPEED[@]}" --name speed_gpu
echo "== throughput, precision=$PRECISION"
timeout 120 python benchmarks/bench_speed.py "${SPEED[@]}" --precision "$PRECISION" --name "speed_gpu_${PRECISION//-/}"
if [[ "${COMPILE:-0}" == "1" ]]; then
  echo "== throughput, torch.compile"
  timeout 180 python benchmarks/bench_speed.py "${SPEED[@]}" --compile --epochs 3 --name speed_gpu_compile
fi
