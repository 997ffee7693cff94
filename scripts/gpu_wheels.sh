#!/usr/bin/env bash
# Download into ./.whl exactly the wheels the lent GPU machine's image lacks (its image: python 3.12, torch
# 2.11+cu130, numba-cuda, transformers, peft, pyarrow, pandas, attrs ... see the device README's KINDS.md),
# check they stay well under the carry budget, and print the `run` call that uses them.
#   bash scripts/gpu_wheels.sh          # run here (needs PyPI); .whl/ is git-ignored, never committed
# Missing there: jsonschema (config validation) and its deps; datasets (only for hub data sources, carried so
# every import works) and its deps that the image lacks. Versions = those this repo is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHEELS=(
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
)
LIMIT_MIB=40
rm -rf .whl && mkdir -p .whl
grep -qx '.whl/' .gitignore 2>/dev/null || echo '.whl/' >> .gitignore
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do plat+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl "${WHEELS[@]}"
n=$(ls .whl/*.whl | wc -l)
[ "$n" -eq "${#WHEELS[@]}" ] || { echo "gpu_wheels: expected ${#WHEELS[@]} wheels, got $n" >&2; exit 1; }
kib=$(du -sk .whl | cut -f1)
ls -1 .whl
echo "gpu_wheels: $n wheels, $((kib / 1024)) MiB ($kib KiB) in .whl (limit ${LIMIT_MIB} MiB)"
[ "$kib" -lt $((LIMIT_MIB * 1024)) ] || { echo "gpu_wheels: over ${LIMIT_MIB} MiB" >&2; exit 1; }
cat <<'RUN'
run call (device tool), e.g. for the checks:
  carry: [".whl"]
  command: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash benchmarks/gpu_checks.sh
  timeout_s: 420
(gpu_checks.sh also installs .whl itself when jsonschema is missing, so `bash benchmarks/gpu_checks.sh` alone works.)
RUN
