# Sourced on the GPU host by device_check.sh and device_run.sh: installs the carried wheels
# (pydantic and gguf; the image has no internet) and sets the environment every device
# command needs. Autotuning is off unless the caller set MODELOPT_SPARSE_AUTOTUNE. A PYTHONPATH set
# before (e.g. by tools/device_fa4.sh) is kept, after ours.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export MODELOPT_SPARSE_AUTOTUNE=${MODELOPT_SPARSE_AUTOTUNE:-0}
source tools/code_fingerprint.sh
read -r stamped_commit stamped_print < .commit 2>/dev/null || stamped_commit="(no .commit)"
if [[ "${stamped_print:-}" != "$(code_fingerprint)" ]]; then
  echo "WARNING: .commit ($stamped_commit) does not match this tree: run tools/stamp_commit.sh before the call" \
    | tee "$OUT/STALE_COMMIT"
fi
