#!/usr/bin/env bash
# GPU checks on the lent H200: install the carried wheels, run the GPU tests, then the
# benchmark, with logs in $OUT and a short summary printed last. Before the call, here:
#   bash tools/stamp_commit.sh          (.commit: HEAD and a code fingerprint; the copy shipped
#                                        to the GPU host has no usable git history)
#   device run: bash tools/device_check.sh          (carry: .whl .commit)
# Tests (310-430 s cold, compile-bound) and the full benchmark (~350 s) do not fit one 600 s
# call together: run them as two calls, SKIP_BENCH=1 then SKIP_TESTS=1.
# Environment knobs: MODEL_BENCH_ARGS (run `bench model` with them), TESTS (pytest paths/-k; default: kernel, launch-config, compiled-model
# and HF-on-GPU tests), PRECOMPILE_ARGS, SKIP_TESTS, SKIP_BENCH, BENCH_ARGS (default: every
# target line of the speed issue: S=16384, D=64 and 128, causal and non-causal, fwd and
# fwd+bwd), TEST_TIMEOUT / BENCH_TIMEOUT in seconds. Tests get SIGINT at their timeout so
# that pytest still prints which tests failed. Autotuning is off (the measured default
# config of each case); set MODELOPT_SPARSE_AUTOTUNE=1 to tune, at minutes of compiling.
# Never wait on a background job with `pgrep -f NAME` in the device command: it matches the
# command's own shell and waits forever.
set -u -o pipefail
source tools/device_env.sh || exit 1
{
  date -u; echo "commit $stamped_commit"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton, transformers, pydantic; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'pydantic', pydantic.__version__)"
} 2>&1 | tee "$OUT/env.txt"
summary=()
if [[ -z "${SKIP_TESTS:-}" ]]; then
  # Compilation dominates; xdist workers compile in parallel on the 16 host cores.
  # -rA lists every finished test, so a run cut at its cap still shows what passed;
  # --durations names the slow ones.
  timeout -s INT -k 30 "${TEST_TIMEOUT:-540}" python3 -m pytest -q -p no:cacheprovider -n 14 -m "gpu or not slow" \
    --tb=short -rA --durations=15 ${TESTS:-tests/test_kernel_triton.py tests/test_launch_configs.py tests/test_hf_compile.py tests/test_hf_triton.py} \
    > "$OUT/gpu_tests.log" 2>&1
  summary+=("gpu tests rc=$? ($(grep -E '[0-9]+ (passed|failed)' "$OUT/gpu_tests.log" | tail -n 1))")
  grep -E "^FAILED" "$OUT/gpu_tests.log" | head -n 10
fi
if [[ -n "${MODEL_BENCH_ARGS:-}" ]]; then
  # Whole models against SDPA (modelopt-sparse bench model); its table prints last.
  timeout "${MODEL_BENCH_TIMEOUT:-300}" python3 -m modelopt_sparse.cli bench model $MODEL_BENCH_ARGS --out "$OUT/model" \
    > "$OUT/bench_model.log" 2>&1
  summary+=("bench model rc=$?")
  tail -n 25 "$OUT/bench_model.log"
fi
if [[ -z "${SKIP_BENCH:-}" ]]; then
  python3 tools/precompile.py ${PRECOMPILE_ARGS:---head-dims 64 128 --causal both} 2>&1 | tail -n 3
  timeout "${BENCH_TIMEOUT:-480}" python3 benchmarks/bench_attention.py \
    ${BENCH_ARGS:---seq-lens 16384 --head-dims 64 128 --causal both} --out "$OUT/bench" > "$OUT/bench.log" 2>&1
  summary+=("bench rc=$?")
  tail -n 30 "$OUT/bench.log"
fi
printf '%s\n' "${summary[@]}"
