#!/usr/bin/env bash
# GPU checks, prepared for a machine with one CUDA device (about 4-5 minutes in all):
#   1. the tests marked `gpu` (skipped on machines without CUDA);
#   2. the throughput part of bench_speed.py on 10^5 simulated cells x 2,000 genes, scVI against CplMixVAE
#      (two agents; LIKELIHOODS, default "gaussian nb": the Gaussian and nb, the default likelihood) at batch
#      sizes 128 and 1,000, in float32 and in mixed precision (Lightning's precision, passed through model.train;
#      PRECISION=16-mixed for float16), each against the card's matmul peak in the same precision;
#   3. with COMPILE=1 (default), a run with plan_kwargs={"compile": True} (torch.compile; the first steps compile),
#      first likelihood only.
# A failing step does not stop the later ones; the exit status is non-zero if any failed.
# Results: benchmarks/results/speed_gpu{SUFFIX}.{md,json}, speed_gpu{SUFFIX}_<precision>.{md,json},
# speed_gpu{SUFFIX}_compile.{md,json} (SUFFIX empty unless set, e.g. SUFFIX=_h200 to keep another card's tables).
#
#   bash benchmarks/gpu.sh                 # from the repository root or anywhere
#   PRECISION=16-mixed COMPILE=0 bash benchmarks/gpu.sh
#   SUFFIX=_h200 bash benchmarks/gpu.sh
#   LIKELIHOODS=nb bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PRECISION="${PRECISION:-bf16-mixed}"
THREADS="${THREADS:-4}"
SUFFIX="${SUFFIX:-}"
read -r -a LIKS <<< "${LIKELIHOODS:-gaussian nb}"
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" NUMBA_NUM_THREADS="$THREADS" MPLBACKEND=Agg
export PYTHONUNBUFFERED=1
failed=0

python - <<'PY' || exit 1
import torch
if not torch.cuda.is_available():
    raise SystemExit("benchmarks/gpu.sh needs a CUDA device; torch sees none.")
import scvi

import scmixvae
print("CUDA device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| scvi-tools", scvi.__version__,
      "| scmixvae", scmixvae.__version__)
PY

echo "== pytest -m gpu"
timeout 150 python -m pytest -q -p no:cacheprovider -m gpu || failed=1

COMMON=(--parts throughput --accelerator gpu --n-cells 100000 --batch-sizes 128 1000 --steps 40 --epochs 2 --repeats 1 --threads "$THREADS")
SPEED=("${COMMON[@]}" --likelihoods "${LIKS[@]}")
echo "== throughput, float32"
timeout 150 python benchmarks/bench_speed.py "${SPEED[@]}" --name "speed_gpu${SUFFIX}" || failed=1
echo "== throughput, precision=$PRECISION"
timeout 150 python benchmarks/bench_speed.py "${SPEED[@]}" --precision "$PRECISION" \
  --name "speed_gpu${SUFFIX}_${PRECISION//-/}" || failed=1
if [[ "${COMPILE:-1}" == "1" ]]; then
  echo "== throughput, torch.compile"
  timeout 150 python benchmarks/bench_speed.py "${COMMON[@]}" --likelihoods "${LIKS[0]}" --compile --epochs 3 --name "speed_gpu${SUFFIX}_compile" || failed=1
fi
exit "$failed"
