#!/bin/bash
# Session 24, call 4: the default kernels at HEAD (learned-sinks epilogue, tile loops SASS-identical)
# against the same tags built from session 23's sources (2144808), rotating A/B.
source tools/device_env.sh > $OUT/env.log 2>&1
export MODELOPT_SPARSE_HOPPER_CACHE=$PWD/build/hopper_cubins
tar xJf build/hopper_cubins.tar.xz -C build
for tags in "d128_dense_pormzwuj d128_8of16t_pormzgwuqj" "d64_dense_pormz3lj d128_2of4t_pormzw"; do
  timeout -s INT -k 5 200 python3 -m modelopt_sparse.kernels.hopper_attention ab $tags --repeats 9 --against build/s24/old_hopper >> $OUT/ab.log 2>&1
  echo "ab rc $?"
done
grep -E "@|x |speed|tag" $OUT/ab.log | tail -14
