#!/usr/bin/env bash
# Before a device call, here: record which commit the shipped tree is, plus a fingerprint of
# its code, in .commit (carry it with .whl). tools/device_check.sh recomputes the fingerprint
# on the GPU host and warns when .commit belongs to another tree (a stale .commit once
# labelled a whole run with the wrong commit). A dirty tree is marked "+dirty".
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/code_fingerprint.sh
dirty=$(git status --porcelain --untracked-files=no | grep -q . && echo "+dirty" || true)
echo "$(git rev-parse HEAD)${dirty} $(code_fingerprint)" > .commit
cat .commit
