#!/usr/bin/env bash
# Run on the lab GPU through the device tool (carry .whl; see README "GPU work"):
#   bash scripts/gpu_tests.sh            GPU-marked tests only
#   bash scripts/gpu_tests.sh --bench    ... then the FLUX.1-dev benchmark, JSON under $OUT
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=$?
if [ "${1:-}" = "--bench" ]; then
  python3 scripts/bench_transformer.py --out "$OUT/bench_transformer.json" 2>&1 | tee "$OUT/bench.log" || exit 1
fi
exit $tests_rc
