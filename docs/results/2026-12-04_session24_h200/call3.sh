#!/bin/bash
source tools/device_env.sh > $OUT/env.log 2>&1
export MODELOPT_SPARSE_HOPPER_CACHE=$PWD/build/hopper_cubins
tar xJf build/hopper_cubins.tar.xz -C build
timeout -s INT -k 5 400 python3 build/s24/window_sweep.py > $OUT/window_sweep.log 2>&1
echo "sweep rc $?"
tail -6 $OUT/window_sweep.log
