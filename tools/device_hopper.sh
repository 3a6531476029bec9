#!/usr/bin/env bash
# Issue 15: the Hopper forward engine's GPU run on the lent H200 (< 250 s in all).
#
# Here, before the call (no GPU needed; ~13 min on 2 cores: 231 cubins, ~29 MB, which travel as
# one ~2.5 MB archive): the standard set, the timed variants, and the whole test set of each
# schedule in TEST_SCHEDULES (kernels/hopper_attention/variant_sets.py):
#   export MODELOPT_SPARSE_HOPPER_CACHE=$PWD/build/hopper_cubins
#   python -m modelopt_sparse.kernels.hopper_attention precompile --test-schedules
#   tar cJf build/hopper_cubins.tar.xz -C build hopper_cubins
#   bash tools/stamp_commit.sh
# Device call, from the repo root:
#   command: bash tools/device_hopper.sh   carry: .whl .commit build/hopper_cubins.tar.xz   timeout_s: 240
#
# Steps (logs in $OUT; each step has its own timeout, so one hang cannot eat the others):
#   1. environment; the carried cubins unpacked (a missing or stale cubin is compiled here);
#   2. smoke: five small calls of the verified default schedule against the float64 reference;
#   3. the timing table (S=16384, H=32, bf16 forward; each engine row first runs once checked,
#      so a timed-out barrier wait is an ERROR row, not a hang): every schedule and variant (the
#      base schedule, ping-pong, no overlap, late rescale, TMA producer, lean softmax and their
#      combinations; 2:4 with P.V through wgmma.sp, stage 3; three consumer warpgroups at D=64,
#      last), dense and N:M, D=128/64, causal and not, against SDPA and Triton; each engine and
#      Triton row with the relative L2 distance of its last 256 rows to the float32 reference
#      ("vs fp32", WRONG above 5e-3); it ends with FASTEST and BEST_SCHEDULE;
#   3b. with AB_TAGS, those kernels timed against each other in repeated rotating rounds;
#   4. the whole GPU test file once, with the measured schedule (measured_schedule in
#      kernels/hopper_attention/variants.py; TEST_SCHEDULE="NAME=0/1 ..." overrides it), 12 xdist
#      workers, after compiling its kernels with 16 jobs; MODELOPT_SPARSE_HOPPER_CHECK=1 (a
#      deadlocked barrier wait becomes an error naming the barrier) and a hung test ends its worker.
# The summary and the table print last.
set -u -o pipefail
source tools/device_env.sh || exit 1
export MODELOPT_SPARSE_HOPPER_CACHE=$PWD/build/hopper_cubins
start=$SECONDS
if [[ -f build/hopper_cubins.tar.xz ]]; then
  tar xJf build/hopper_cubins.tar.xz -C build || echo "WARNING: could not unpack the carried cubins"
fi
{
  date -u; echo "commit $stamped_commit"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "nvcc: $(command -v nvcc) $(nvcc --version 2>/dev/null | tail -n 1)"
  echo "carried cubins: $(ls "$MODELOPT_SPARSE_HOPPER_CACHE"/*.cubin 2>/dev/null | wc -l)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout 60 python3 -m modelopt_sparse.kernels.hopper_attention precompile --jobs 16 --no-report \
  > "$OUT/precompile.log" 2>&1
pre_rc=$?
echo "precompile rc=$pre_rc ($((SECONDS - start)) s)"

timeout 40 python3 -m modelopt_sparse.kernels.hopper_attention smoke > "$OUT/smoke.log" 2>&1
smoke_rc=$?
cat "$OUT/smoke.log"

# The table first: its BEST_SCHEDULE decides the schedule the test suite runs with.
timeout 130 python3 -m modelopt_sparse.kernels.hopper_attention bench --budget 100 > "$OUT/bench.log" 2>&1
bench_rc=$?
echo "bench rc=$bench_rc ($((SECONDS - start)) s)"

# AB_TAGS="d64_dense_pormz3 d64_dense_prmz3 ...": those kernels against each other in repeated
# rotating rounds (ab_table.py), for decisions below the table's run-to-run spread.
if [[ -n "${AB_TAGS:-}" ]]; then
  # shellcheck disable=SC2086 # the tags are words
  timeout "${AB_TIMEOUT:-120}" python3 -m modelopt_sparse.kernels.hopper_attention ab $AB_TAGS \
    --repeats "${AB_REPEATS:-5}" > "$OUT/ab.log" 2>&1
  echo "ab rc=$? ($((SECONDS - start)) s)"
  sed -n '/^A\/B, S=/,$p' "$OUT/ab.log"
fi

# The tests run the measured schedule (hopper_attention.variants.measured_schedule, no switch set) unless
# TEST_SCHEDULE names switches ("NAME=0/1 ..."), e.g. the table's BEST_SCHEDULE line.
best=${TEST_SCHEDULE:-}
echo "test schedule: ${best:-measured (no switch set)}"
# shellcheck disable=SC2086 # the schedule is NAME=VALUE words
[[ -n "$best" ]] && export $best

timeout 45 python3 -m modelopt_sparse.kernels.hopper_attention precompile --jobs 16 --no-report --schedule-from-env \
  > "$OUT/precompile_schedule.log" 2>&1
sched_rc=$?
echo "precompile (test schedule) rc=$sched_rc ($((SECONDS - start)) s)"

left=$((240 - (SECONDS - start)))
timeout -s INT -k 5 $((left > 30 ? left : 30)) python3 -m pytest -v -p no:cacheprovider -n 12 -m gpu --tb=short -rA \
  tests/test_kernel_hopper.py > "$OUT/gpu_tests.log" 2>&1
test_rc=$?
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -n 30
grep -E "timed out|Timeout|Fatal Python error|worker .* crashed" "$OUT/gpu_tests.log" | head -n 5

echo "== summary ($((SECONDS - start)) s)"
echo "precompile rc=$pre_rc; smoke rc=$smoke_rc ($(grep -c '^ok' "$OUT/smoke.log") ok, $(grep -c '^FAIL' "$OUT/smoke.log") failed)"
echo "bench rc=$bench_rc; test schedule: ${best:-measured}"
echo "gpu tests rc=$test_rc: $(grep -E '[0-9]+ (passed|failed)' "$OUT/gpu_tests.log" | tail -n 1)" \
  "(verdict lines: $(grep -c ' PASSED' "$OUT/gpu_tests.log") passed, $(grep -c ' FAILED' "$OUT/gpu_tests.log") failed)"
sed -n '/^forward, S=/,$p' "$OUT/bench.log"
