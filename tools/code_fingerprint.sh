# code_fingerprint: one hash over the package, tools, tests and benchmarks (Python, shell and CUDA
# sources) as they are on disk; the same on this machine and on the GPU host, which has no usable
# git history.
code_fingerprint() {
  find modelopt_sparse tools tests benchmarks -type f \( -name '*.py' -o -name '*.sh' -o -name '*.cu' -o -name '*.cuh' \) -print0 \
    | LC_ALL=C sort -z | xargs -0 sha1sum | sha1sum | cut -c1-12
}
