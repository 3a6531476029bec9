#!/usr/bin/env bash
# Nsight Compute on the Hopper engine (issue 15): where the consumer warps stall, per pattern.
#
# One launch of each kernel (S=8192, H=32, D=128 or HEAD_DIM=64, bf16, causal forward, the measured schedule;
# PATTERNS, default "dense 2:4 2:4+sp"; +sp: stage 3's P.V through wgmma.sp; +hs: M = 16's selection on
# f16 copies (NMH_HALF_SELECT); "fa4": FlashAttention-4's
# kernel on the same problem, when tools/device_fa4.sh installed it; the second launch is
# profiled: the first call loads or compiles the kernel), sections SpeedOfLight,
# WarpStateStats, SchedulerStats, ComputeWorkloadAnalysis, InstructionStats, Occupancy. Prints
# the stall table of each kernel last; the full reports go to $OUT/ncu_<pattern>.txt.
# Device call, from a snapshot (see docs/hopper_engine.md, "The GPU run"):
#   command: bash tools/profile_hopper_ncu.sh   carry: the snapshot   timeout_s: ~240
# SOURCE=1 adds per-instruction stall sampling (see the end). Needs ncu (CUDA toolkit) and permission to read the GPU's performance counters; says so and
# exits 0 when either is missing, so that it can share a device call with other steps.
set -u -o pipefail
source tools/device_env.sh || exit 1
export MODELOPT_SPARSE_HOPPER_CACHE=${MODELOPT_SPARSE_HOPPER_CACHE:-$PWD/build/hopper_cubins}
[[ -f build/hopper_cubins.tar.xz && ! -d $MODELOPT_SPARSE_HOPPER_CACHE ]] && tar xJf build/hopper_cubins.tar.xz -C build
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
if [[ -z "$NCU" ]]; then
  echo "ncu: not found on this machine (no Nsight Compute): skipped"
  exit 0
fi
echo "ncu: $NCU ($($NCU --version 2>/dev/null | tail -n 1))"
cat > "$OUT/ncu_case.py" <<'EOF'
import os
import sys
import torch
from modelopt_sparse.kernels import attention

pattern, _, extra = sys.argv[1].partition("+")
s, h, d = 8192, 32, int(os.environ.get("HEAD_DIM", "128"))
q, k, v = (torch.randn(s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
if pattern == "fa4":  # FlashAttention-4's sm90 kernel on the same problem (tools/device_fa4.sh installs it)
    from flash_attn.cute import flash_attn_func
    q4, k4, v4 = (t.unsqueeze(0) for t in (q, k, v))
    call = lambda: flash_attn_func(q4, k4, v4, causal=True)
else:
    if extra == "sp":  # stage 3: 2:4 P.V through wgmma.sp
        os.environ["MODELOPT_SPARSE_HOPPER_SPARSE_PV"] = "1"
    if extra == "hs":  # M = 16: the selection network on f16 copies (session 21)
        os.environ["MODELOPT_SPARSE_HOPPER_HALF_SELECT"] = "1"
    n, m = (int(x) for x in pattern.split(":")) if pattern != "dense" else (0, 4)
    start = torch.zeros(1, dtype=torch.int32, device="cuda")
    length = torch.full((1,), s, dtype=torch.int32, device="cuda")
    call = lambda: attention(q, k, v, start, length, s, sparsity_n=n, sparsity_m=m, backend="hopper")
for _ in range(2):  # the first call loads (or JIT-compiles) the kernel; ncu profiles the second launch
    call()
torch.cuda.synchronize()
EOF
SECTIONS=(--section SpeedOfLight --section WarpStateStats --section SchedulerStats
          --section ComputeWorkloadAnalysis --section InstructionStats --section Occupancy)
METRICS='regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__(inst_executed_)?pipe_.*(cycles_active|inst_executed)\.avg\.pct_of_peak_sustained_active'
for pattern in ${PATTERNS:-dense 2:4 2:4+sp}; do
  name=${pattern/:/of}; name=${name/+/_}
  report="$OUT/ncu_$name.txt"
  if [[ $pattern == fa4 ]]; then kernel=(--kernel-name 'regex:(?i)flash'); else kernel=(--kernel-name nm_attn_fwd); fi
  filter=("${kernel[@]}" --launch-skip 1 --launch-count 1)
  timeout 120 "$NCU" "${filter[@]}" "${SECTIONS[@]}" --metrics "$METRICS" \
    python3 "$OUT/ncu_case.py" "$pattern" > "$report" 2>&1
  rc=$?
  if grep -q "==ERROR==.*metric" "$report"; then  # this ncu does not take the metric list: sections only
    grep -m 2 "==ERROR==" "$report"
    timeout 120 "$NCU" "${filter[@]}" "${SECTIONS[@]}" \
      python3 "$OUT/ncu_case.py" "$pattern" > "$report" 2>&1
    rc=$?
  fi
  grep -m 3 "==ERROR==" "$report"
  if grep -q "ERR_NVGPUCTRPERM" "$report"; then
    echo "ncu: no permission to read the performance counters (ERR_NVGPUCTRPERM): skipped"
    exit 0
  fi
  echo "== $pattern (ncu rc=$rc)"
  grep -E "SM Frequency|Duration|Memory Throughput|Compute \(SM\) Throughput|Issue Slots Busy|Issued Warp Per Scheduler|No Eligible|Warp Cycles Per Issued|Executed Ipc" \
    "$report" | head -n 14
  # The stall reasons (warps per issue, largest first) and the busiest pipes.
  grep -E "issue_stalled" "$report" | awk '{print $NF, $1}' | sort -rn | head -n 8
  grep -E "sm__(inst_executed_)?pipe_" "$report" | awk '{print $NF, $1}' | sort -rn | head -n 8
done

# SOURCE=1: where the stalls sit, per SASS instruction (PC sampling, SourceCounters): one more
# profiled launch per pattern, exported and read back as the source page (CSV, in $OUT), then
# the instructions with the most samples of the stall reason SOURCE_STALL (default "wait";
# all samples when the CSV has no per-reason column), with their neighbours' opcodes.
if [[ -n "${SOURCE:-}" ]]; then
  for pattern in ${PATTERNS:-dense 2:4 2:4+sp}; do
    name=${pattern/:/of}; name=${name/+/_}
    if [[ $pattern == fa4 ]]; then kernel=(--kernel-name 'regex:(?i)flash'); else kernel=(--kernel-name nm_attn_fwd); fi
    timeout 150 "$NCU" "${kernel[@]}" --launch-skip 1 --launch-count 1 --section SourceCounters --section WarpStateStats \
      -f -o "$OUT/src_$name" python3 "$OUT/ncu_case.py" "$pattern" > "$OUT/src_$name.log" 2>&1
    timeout 60 "$NCU" -i "$OUT/src_$name.ncu-rep" --page source --csv --print-source sass > "$OUT/src_$name.csv" 2>&1
    echo "== $pattern: per-instruction stalls (ncu rc=$?, $(wc -l < "$OUT/src_$name.csv") lines)"
    python3 - "$OUT/src_$name.csv" "${SOURCE_STALL:-wait}" <<'PY'
import csv, re, sys
path, reason = sys.argv[1], sys.argv[2]
rows = list(csv.reader(open(path, errors="replace")))
head_i = next((i for i, r in enumerate(rows) if any("Source" == c.strip() for c in r)), None)
if head_i is None:
    print("no source table in the CSV:", rows[:3]); sys.exit(0)
head, body = rows[head_i], [r for r in rows[head_i + 1:] if len(r) == len(rows[head_i])]
print("columns:", "; ".join(head))
def col(pat):
    return next((i for i, c in enumerate(head) if re.search(pat, c, re.I)), None)
src = head.index(next(c for c in head if c.strip() == "Source"))
key = col(re.escape(reason)) or col(r"Warp Stall Sampling \(All") or col(r"Sampl")
def num(x):
    try: return float(x.replace(",", ""))
    except ValueError: return 0.0
total = sum(num(r[key]) for r in body) or 1.0
print(f"sorted by: {head[key]} (total {total:.0f})")
order = sorted(range(len(body)), key=lambda i: -num(body[i][key]))
for i in order[:30]:
    ctx = " | ".join(body[j][src].strip()[:28] for j in range(max(i - 2, 0), i))
    print(f"{num(body[i][key]) / total:6.1%}  {body[i][src].strip()[:60]:<60}  after: {ctx}")
PY
  done
fi
