#!/usr/bin/env bash
# Prepare the GPU check (bench/gpu_check.sh): download, here, the wheels the GPU machine lacks. That machine has no
# network; it has Python 3.12 with a CUDA torch, transformers 5.x, msgpack, safetensors, tokenizers, pytest,
# accelerate and numpy, but no pyzmq and no dill. Into .gpu-wheels/ (carried to it; git ignores it), for CPython 3.12
# on manylinux x86_64, no dependencies pulled in, one version of each:
#   - the slicegpt env: transformers==4.41.0 (the official slicegpt's pin) and what it needs in the versions it
#     accepts (tokenizers>=0.19,<0.20; huggingface-hub>=0.23,<1.0), as requirements/slicegpt-env.txt's env has them;
#   - both envs: pyzmq (slicebridge's dependency) and dill (the slicegpt env's pin: the .bin files' pickler).
# No torch: the machine's CUDA build serves both envs. And into .gpu-wheels-cpu/ the same binary wheels for this
# machine's Python, so that `bench/gpu_check.sh --cpu-dry-run` makes its envs from these wheels here too.
#
#   bash bench/gpu_prepare.sh            # then: bash bench/gpu_check.sh --cpu-dry-run; on the GPU machine, carry
#                                        # .gpu-wheels and run bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.envs/base/bin/python}  # any Python with pip; the local wheels are for its version
WHEELS=.gpu-wheels
CPU_WHEELS=.gpu-wheels-cpu
PURE=(transformers==4.41.0 huggingface-hub==0.36.2 dill==0.3.8)
BINARY=(tokenizers==0.19.1 pyzmq==27.3.0)
# manylinux tags pip must be told one by one (it matches N exactly); the wheels above carry these.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_26_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)

download() {  # download DIR PYTHON_VERSION REQUIREMENT...
  local dir=$1 version=$2
  shift 2
  # --isolated: no pip.conf or PIP_* (a local find-links or constraints file must not pick other versions)
  "$PYTHON" -m pip download --isolated --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --implementation cp --python-version "$version" "${PLATFORMS[@]/#/--platform=}" --dest "$dir" "$@"
}

rm -rf "$WHEELS" "$CPU_WHEELS"
download "$WHEELS" 3.12 "${PURE[@]}" "${BINARY[@]}"
download "$CPU_WHEELS" "$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" "${BINARY[@]}"

echo "for the GPU machine, $WHEELS/ (carry it):"
ls -l "$WHEELS"
echo "for the CPU dry run here, $CPU_WHEELS/:"
ls -l "$CPU_WHEELS"
total=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
echo "total carried: $((total / 1024)) KiB (the device's limit: 64 MiB with the repo)"
for ignored in "$WHEELS" "$CPU_WHEELS"; do
  git check-ignore -q "$ignored" || echo "warning: git does not ignore $ignored/: add /$ignored/ to .gitignore" >&2
done
