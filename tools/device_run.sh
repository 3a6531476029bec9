#!/usr/bin/env bash
# Run one command on the GPU host with the project's environment (carried wheels installed,
# PYTHONPATH, autotuning off, .commit checked), e.g.
#   bash tools/device_run.sh python3 tools/sweep_configs.py --head-dim 64 --kinds dkdv dq --out "$OUT/sweep.json"
# (carry .whl and .commit; run tools/stamp_commit.sh here first).
set -u -o pipefail
source tools/device_env.sh || exit 1
echo "commit $stamped_commit"
"$@"
