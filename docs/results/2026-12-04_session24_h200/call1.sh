#!/bin/bash
# Session 24, call 1: the Hopper file (whole, incl. test_gpu_39 compiled graphs), the compile GPU
# tests, the pip-nvcc cubin check, then the compiled-graph timing.
source tools/device_env.sh > $OUT/env.log 2>&1
export MODELOPT_SPARSE_HOPPER_CACHE=$PWD/build/hopper_cubins
tar xJf build/hopper_cubins.tar.xz -C build
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/gpu.txt 2>&1
timeout 60 python3 -m modelopt_sparse.kernels.hopper_attention precompile --jobs 16 --no-report > $OUT/precompile.log 2>&1
timeout -s INT -k 5 200 python3 -m pytest -v -p no:cacheprovider -n 12 -m gpu --tb=short -rA tests/test_kernel_hopper.py > $OUT/hopper_tests.log 2>&1
echo "hopper file rc $?"
timeout -s INT -k 5 120 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short tests/test_hf_compile.py > $OUT/hf_compile.log 2>&1
echo "hf_compile rc $?"
(unset MODELOPT_SPARSE_HOPPER_CACHE; timeout 60 python3 build/s24/pip_nvcc_check.py run > $OUT/pip_nvcc.log 2>&1; echo "pip nvcc rc $?")
timeout -s INT -k 5 200 python3 build/s24/compiled_bench.py > $OUT/compiled_bench.log 2>&1
echo "compiled bench rc $?"
echo "=== summary ==="
cat $OUT/gpu.txt
tail -3 $OUT/hopper_tests.log | cut -c1-300
grep -E "FAILED|ERROR" $OUT/hopper_tests.log | head -10 | cut -c1-250
tail -2 $OUT/hf_compile.log | cut -c1-300
tail -2 $OUT/pip_nvcc.log
tail -7 $OUT/compiled_bench.log
