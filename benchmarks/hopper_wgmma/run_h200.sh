#!/bin/bash
# One device call: environment, (re)build if the carried binary does not load, run everything.
# Usage on the GPU host, from the repository root:  OUT=/some/dir bash benchmarks/hopper_wgmma/run_h200.sh
set -u
OUT=${OUT:-/tmp/wgmma_out}
mkdir -p "$OUT"
cd "$(dirname "$0")"
NVCC_FLAGS="-O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu --format=csv
  nvcc --version | tail -2
  uname -r
} > "$OUT/env.txt" 2>&1
BIN=./wgmma_bench.bin
if ! timeout 60 "$BIN" --info >> "$OUT/env.txt" 2>&1; then
  echo "carried binary did not run; building here" | tee -a "$OUT/env.txt"
  timeout 300 nvcc $NVCC_FLAGS wgmma_bench.cu -o /tmp/wgmma_bench >> "$OUT/env.txt" 2>&1 || exit 5
  BIN=/tmp/wgmma_bench
fi
cuobjdump -sass "$BIN" 2>/dev/null | grep -o "HGMMA[.A-Z0-9x]*" | sort | uniq -c >> "$OUT/env.txt"
timeout 300 nvidia-smi dmon -s pc -d 1 > "$OUT/dmon.txt" 2>&1 &
DM=$!
timeout 240 "$BIN" "$OUT/results.json" > "$OUT/log.txt" 2>&1
rc=$?
kill "$DM" 2>/dev/null
nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
cat "$OUT/log.txt"
echo "exit code $rc"
exit $rc
