#!/usr/bin/env bash
# Issue 15 stage 2: the Hopper forward engine's GPU run on the lent H200 (< 200 s in all).
#
# Here, before the call (no GPU needed; ~4 min on 2 cores, the cubins then travel):
#   MODELOPT_SPARSE_HOPPER_CACHE=$PWD/build/hopper_cubins python -m modelopt_sparse.kernels.hopper_attention precompile
#   bash tools/stamp_commit.sh
# Device call, from the repo root:
#   command: bash tools/device_hopper.sh        carry: .whl .commit build/hopper_cubins        timeout_s: 240
#
# Steps (logs in $OUT; each step has its own timeout, so one hang cannot eat the others):
#   1. environment, and the cubin cache (a missing or stale cubin is compiled here, 16 jobs);
#   2. smoke: five small calls against the float64 reference with diagnostics (error, LSE,
#      which rows are off), dense non-causal first;
#   3. the GPU tests of tests/test_kernel_hopper.py, -v (every test's verdict as it finishes),
#      8 xdist workers; the kernels run with MODELOPT_SPARSE_HOPPER_CHECK=1 (a deadlocked
#      barrier wait becomes an error naming the barrier) and a hung test ends its worker;
#   4. the timing table: S=16384, H=32, bf16 forward, the engine's schedules against the Triton
#      forward and SDPA (rows past the time budget are skipped, not cut).
# The summary and the table print last.
set -u -o pipefail
source tools/device_env.sh || exit 1
export MODELOPT_SPARSE_HOPPER_CACHE=$PWD/build/hopper_cubins
start=$SECONDS
{
  date -u; echo "commit $stamped_commit"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "nvcc: $(command -v nvcc) $(nvcc --version 2>/dev/null | tail -n 1)"
  echo "carried cubins: $(ls "$MODELOPT_SPARSE_HOPPER_CACHE"/*.cubin 2>/dev/null | wc -l)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout 90 python3 -m modelopt_sparse.kernels.hopper_attention precompile --jobs 16 > "$OUT/precompile.log" 2>&1
pre_rc=$?
echo "precompile rc=$pre_rc ($((SECONDS - start)) s)"

timeout 45 python3 -m modelopt_sparse.kernels.hopper_attention smoke > "$OUT/smoke.log" 2>&1
smoke_rc=$?
cat "$OUT/smoke.log"

timeout -s INT -k 10 85 python3 -m pytest -v -p no:cacheprovider -n 8 -m gpu --tb=short -rA \
  tests/test_kernel_hopper.py > "$OUT/gpu_tests.log" 2>&1
test_rc=$?
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -n 25
grep -E "timed out|Timeout|Fatal Python error|worker .* crashed" "$OUT/gpu_tests.log" | head -n 5

left=$((190 - (SECONDS - start)))
budget=$((left > 40 ? left - 20 : 20))
timeout $((budget + 15)) python3 -m modelopt_sparse.kernels.hopper_attention bench --budget "$budget" \
  > "$OUT/bench.log" 2>&1
bench_rc=$?

echo "== summary ($((SECONDS - start)) s)"
echo "precompile rc=$pre_rc; smoke rc=$smoke_rc ($(grep -c '^ok' "$OUT/smoke.log") ok, $(grep -c '^FAIL' "$OUT/smoke.log") failed)"
echo "gpu tests rc=$test_rc: $(grep -E '[0-9]+ (passed|failed)' "$OUT/gpu_tests.log" | tail -n 1)"
echo "bench rc=$bench_rc"
sed -n '/^forward, S=/,$p' "$OUT/bench.log"
