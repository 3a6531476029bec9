#!/usr/bin/env bash
# The folder a device call carries: .snap/ = `git archive HEAD` (committed code only, so the
# run matches a commit), the carried wheels (.whl/), the precompiled Hopper cubins when
# build/hopper_cubins.tar.xz exists (built from the same commit's kernel sources: precompile
# after committing kernel edits), and .commit (HEAD and the code fingerprint that
# tools/device_env.sh checks). docs/ is left out (size). Then, for example:
#   device: command "cd .snap && bash tools/device_hopper.sh", carry [".snap"]
set -eu -o pipefail
cd "$(git rev-parse --show-toplevel)"
rm -rf .snap && mkdir .snap
git archive HEAD | tar -x -C .snap
rm -rf .snap/docs
mkdir -p .whl && cp ../shared/wheels/*.whl .whl/ 2>/dev/null || true
cp -r .whl .snap/
if [[ -f build/hopper_cubins.tar.xz ]]; then
  mkdir -p .snap/build && cp build/hopper_cubins.tar.xz .snap/build/
fi
(cd .snap && source tools/code_fingerprint.sh && echo "$(git -C .. rev-parse HEAD) $(code_fingerprint)" > .commit)
git diff --quiet HEAD || echo "note: uncommitted changes are not in .snap"
echo ".snap: $(cut -c1-12 .snap/.commit), $(du -sh .snap | cut -f1)$([[ -f .snap/build/hopper_cubins.tar.xz ]] && echo ', with cubins')"
