#!/bin/bash
# Session 24, call 2 (learned sinks, 9833b5f+): the whole Hopper GPU file, test_hf_compile's GPU
# tests to the end, the GPT-OSS-shaped sinks benchmark.
source tools/device_env.sh > $OUT/env.log 2>&1
export MODELOPT_SPARSE_HOPPER_CACHE=$PWD/build/hopper_cubins
tar xJf build/hopper_cubins.tar.xz -C build
timeout 60 python3 -m modelopt_sparse.kernels.hopper_attention precompile --jobs 16 --no-report > $OUT/precompile.log 2>&1
timeout -s INT -k 5 220 python3 -m pytest -v -p no:cacheprovider -n 12 -m gpu --tb=short -rA tests/test_kernel_hopper.py > $OUT/hopper_tests.log 2>&1
echo "hopper file rc $?"
timeout -s INT -k 5 60 python3 build/s24/sinks_bench.py > $OUT/sinks_bench.log 2>&1
echo "sinks bench rc $?"
timeout -s INT -k 5 250 python3 -m pytest -v -p no:cacheprovider -m gpu --tb=short -rA tests/test_hf_compile.py > $OUT/hf_compile.log 2>&1
echo "hf_compile rc $?"
echo "=== summary ==="
tail -1 $OUT/hopper_tests.log | cut -c1-300
grep -E "^FAILED|^ERROR" $OUT/hopper_tests.log | head -10 | cut -c1-250
grep -E "PASSED|FAILED" $OUT/hf_compile.log | wc -l; tail -1 $OUT/hf_compile.log | cut -c1-200
grep -E "^FAILED|^ERROR" $OUT/hf_compile.log | head -5 | cut -c1-250
tail -7 $OUT/sinks_bench.log
