#!/usr/bin/env bash
# FlashAttention-4 (flash-attn-4) and the CuTe DSL on the GPU host, whose image has no internet
# and whose calls carry at most 64 MiB: the 92 MB nvidia-cutlass-dsl-libs-cu13 wheel travels as
# an xz tarball of its unpacked files (63.5 MB with xz -9e) in two parts, over two calls made
# back to back (the host keeps /tmp while it stays warm, 30 s after a call).
#
# Here (internet), once:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d W \
#     nvidia-cutlass-dsl-libs-cu13==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
#     nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl==4.8.1 flash-attn-4==4.0.0b36 \
#     quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
#   (and into W/extra: einops, protobuf, cuda-pathfinder, cuda-bindings 13.x: each installed only if
#   the image cannot import it; cuda-bindings 13.5 needs cuda-pathfinder)
#   mkdir X && (cd X && unzip -q W/nvidia_cutlass_dsl_libs_cu13-*.whl) && tar cf - -C X . | xz -9e > cu13.tar.xz
#   split -b 31800000 -d cu13.tar.xz cupart     -> .fa1/cupart00, .fa2/cupart01 + the other wheels + extra/
#   (both folders in .git/info/exclude)
# Device call 1 (carry .fa1 and the rest):  bash tools/device_fa4.sh stash .fa1
# Device call 2 (carry .fa2):               source tools/device_fa4.sh install .fa2
# After "install" (sourced), PYTHONPATH has /tmp/fsite and `from flash_attn.cute import
# flash_attn_func` works; later calls on the same warm host only need that PYTHONPATH:
#   export PYTHONPATH=/tmp/fsite:/tmp/fsite/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
# (the meta wheel's .pth file is not read from a PYTHONPATH entry, hence the second path).
# Session 13: this ran FA4 on the H200 (the image has einops, protobuf, cuda-bindings 13.3.1 and
# cuda-pathfinder 1.8.1, so the extras are not installed there).
fa4_action=${1:-}
fa4_dir=${2:-}
case "$fa4_action" in
  stash)
    mkdir -p /tmp/fa4parts && cp "$fa4_dir"/cupart* /tmp/fa4parts/ && echo "FA4: stashed $(ls /tmp/fa4parts | wc -l) part(s) in /tmp/fa4parts"
    ;;
  install)
    cp "$fa4_dir"/cupart* /tmp/fa4parts/ 2>/dev/null || { mkdir -p /tmp/fa4parts && cp "$fa4_dir"/cupart* /tmp/fa4parts/; }
    mkdir -p /tmp/fsite
    if cat /tmp/fa4parts/cupart* | xz -d | tar xf - -C /tmp/fsite; then
      # Unzipped, not `pip install --target`: pip skips a top-level folder that exists already,
      # and nvidia_cutlass_dsl/ (from the tarball) is one, so libs-base's cutlass/cute would be
      # missing (session 13: "No module named 'cutlass.cute'"). A wheel is a zip; unzipping merges.
      for wheel in "$fa4_dir"/*.whl; do python3 -m zipfile -e "$wheel" /tmp/fsite; done
      for mod_wheel in einops:einops protobuf:google.protobuf cuda_pathfinder:cuda.pathfinder cuda_bindings:cuda.bindings; do
        python3 -c "import ${mod_wheel#*:}" 2>/dev/null ||
          python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fsite "$fa4_dir"/extra/"${mod_wheel%%:*}"-*.whl
      done
      export PYTHONPATH=/tmp/fsite:/tmp/fsite/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-}
      python3 -c "from flash_attn.cute import flash_attn_func; import flash_attn, cutlass; print('FA4 ready:', flash_attn.__file__)" \
        > /tmp/fa4_import.log 2>&1 && tail -n 1 /tmp/fa4_import.log ||
        { echo "FA4: installed but the import fails:"; grep -E "Error|^  File" /tmp/fa4_import.log | tail -n 12; }
    else
      echo "FA4: the parts in /tmp/fa4parts do not unpack (call 1 missing, or the host was not kept warm)"
    fi
    ;;
  *)
    echo "usage: tools/device_fa4.sh stash DIR | source tools/device_fa4.sh install DIR"
    ;;
esac
