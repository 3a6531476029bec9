#!/usr/bin/env bash
# One call on the lent H200: install the carried wheels, run the GPU test-suite and the
# benchmark, leave logs in $OUT and print a short summary last.
#   device run: bash tools/device_check.sh [pytest-args...]   (carry: .whl)
set -u -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target .site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1
{
  date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, transformers, pydantic; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'pydantic', pydantic.__version__)"
  git rev-parse HEAD 2>/dev/null || true
} 2>&1 | tee "$OUT/env.txt"
# Compilation dominates; xdist workers compile in parallel on the 16 host cores.
MODELOPT_SPARSE_AUTOTUNE=0 python3 -m pytest -q -x -p no:cacheprovider -n "${PYTEST_WORKERS:-8}" -m "gpu or not slow" "${@:-tests}" 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 30
tests_rc=$?
if [[ -f benchmarks/bench_attention.py && -z "${SKIP_BENCH:-}" ]]; then
  python3 benchmarks/bench_attention.py ${BENCH_ARGS:-} --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -n 60
fi
echo "gpu tests exit code: $tests_rc"
