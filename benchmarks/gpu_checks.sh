#!/usr/bin/env bash
# Every GPU-only check of the cuda backend in one command, for a session that has a GPU (H100/H200):
#   bash benchmarks/gpu_checks.sh            # results under $OUT (or a temp folder), summary on stdout
# Stages (each with its own time limit, 90+150+90+150 s: under 8 minutes on an H100 even if every one runs out):
#   1. kernel GPU tests            pytest -m gpu tests/kernels
#   2. cuda backend GPU tests      pytest -m gpu tests/cuda_backend  (bf16 parity vs transformers on both
#                                  attention paths, fp32 GPU == cpu backend, CUDA graphs == eager with no
#                                  allocation after the captured step, measured peak within 3% of the plan)
#   3. memory peak vs plan         benchmarks/memory_peak.py (Qwen3-0.6B-shaped, LoRA, seq 2048, 2 x 4)
#   4. throughput vs HF + peft     benchmarks/throughput.py  (same job)
# Python: $PY, else .venv/bin/python if its torch sees a GPU, else python3. The package is installed editable
# (--no-deps, no build isolation) when not importable; missing pure-Python deps (jsonschema & co.) are
# installed from ./.whl if that folder exists (pip download --no-deps --only-binary=:all: into it beforehand).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d -t surogate-gpu-XXXX)}
mkdir -p "$OUT"
export NUMBA_ENABLE_CUDASIM=0 PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PY=.venv/bin/python
  else
    PY=python3
  fi
fi
{ echo "python: $PY"; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; nvidia-smi -L; } 2>&1 | tee "$OUT/env.txt"
if [ -d .whl ]; then $PY -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | tail -2; fi
if ! $PY -c "import surogate.runtime.backends.cuda" 2>/dev/null; then
  $PY -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -2
fi
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
stage() {  # stage NAME LIMIT_SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "$name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$SUMMARY"
}
stage kernels_gpu 90 $PY -m pytest -m gpu tests/kernels -q -x -p no:cacheprovider
stage cuda_backend_gpu 150 $PY -m pytest -m gpu tests/cuda_backend -q -p no:cacheprovider -rs
stage memory_peak 90 $PY benchmarks/memory_peak.py --steps 3 --json "$OUT/memory_peak.json"
stage throughput 150 $PY benchmarks/throughput.py --steps 3 --json "$OUT/throughput.json"
echo "== summary"; cat "$SUMMARY"
