#!/usr/bin/env bash
# The GPU check (issue 16) in one command, with no network: make the two envs, print their versions and the device,
# run the tests marked gpu, then bench/gpu_check.py, which writes gpu.md and gpu.json into OUT_DIR.
#
#   bash bench/gpu_check.sh [--cpu-dry-run] [OUT_DIR] [-- DRIVER_OPTION...]
#
# OUT_DIR defaults to $OUT when set (the GPU machine's folder that comes back), else bench/results (the GPU run) or
# bench/results/gpu-dry (the dry run); gpu_check.log there holds everything printed. DRIVER_OPTION...: more options
# for bench/gpu_check.py (`-- --scales 1b`: a shorter run, without the ~7B-shaped model).
#
# On the GPU machine (Python 3.12, a CUDA torch, transformers 5.x; no pyzmq, no dill): both envs are made from its
# python3 ($PYTHON), without any download, from the wheels bench/gpu_prepare.sh put in .gpu-wheels/ (carry it):
#   - base: a venv whose .pth adds the machine's site-packages (its CUDA torch, transformers 5.x, pytest) and this
#     repo, plus pyzmq and dill from the wheels;
#   - slicegpt: a venv whose own site-packages hold transformers==4.41.0, tokenizers, huggingface-hub, pyzmq and dill
#     from the wheels, ahead of the machine's site-packages (its CUDA torch, numpy, safetensors, msgpack), which a
#     .pth adds after them. (venv's --system-site-packages would add the base interpreter's site-packages, not the
#     packages of a python that is itself a venv, as the machine's is.)
# The server runs the slicegpt env's python with -I: only site-packages and .pth files reach it, as here.
#
# --cpu-dry-run: the same steps on the CPU with tiny sizes (bench/gpu_check.py --dry-run). The envs are made the
# same way, from .envs/base's python and the prepared wheels (.gpu-wheels, plus .gpu-wheels-cpu for this Python),
# when bench/gpu_prepare.sh has been run; without them (CI) .envs/base and .envs/slicegpt (or
# $SLICEBRIDGE_TEST_SLICEGPT_ENV, as for the tests) are used as they are.
set -uo pipefail  # not -e: every step runs, and gpu.md says what failed
cd "$(dirname "$0")/.."
REPO=$PWD

DRY_RUN=0
OUT_DIR=
INVOKED="bash bench/gpu_check.sh $*"
while [ $# -gt 0 ]; do
  case $1 in
    --cpu-dry-run) DRY_RUN=1 ;;
    --) shift; break ;;
    -h | --help) sed -n '2,9p' "$0" | cut -c3-; exit 0 ;;
    -*) echo "usage: bash bench/gpu_check.sh [--cpu-dry-run] [OUT_DIR] [-- DRIVER_OPTION...]" >&2; exit 2 ;;
    *) OUT_DIR=$1 ;;
  esac
  shift
done
if [ -z "$OUT_DIR" ]; then
  if [ "$DRY_RUN" = 1 ]; then OUT_DIR=${OUT:-bench/results/gpu-dry}; else OUT_DIR=${OUT:-bench/results}; fi
fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
TEE=$!

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
WHEELS=(.gpu-wheels)
if [ "$DRY_RUN" = 1 ]; then
  MACHINE_PYTHON=${PYTHON:-.envs/base/bin/python}
  WHEELS+=(.gpu-wheels-cpu)
else
  MACHINE_PYTHON=${PYTHON:-python3}
fi
ENVS=$(mktemp -d "${TMPDIR:-/tmp}/slicebridge-gpu-envs-XXXXXX")
trap 'rm -rf "$ENVS"; exec >&- 2>&-; wait "$TEE"' EXIT  # the log complete before the folder is collected

# make_env NAME EXTRA_PATH PACKAGE...: a venv of the machine's python; its own site-packages get PACKAGE... from the
# wheels, then (a .pth) EXTRA_PATH and the machine's site dirs, whose own .pth files site.addsitedir runs too.
make_env() {
  local name=$1 extra=$2 env=$ENVS/$1 site
  shift 2
  "$MACHINE_PYTHON" -m venv --without-pip "$env" || return 1
  site=$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
  {
    [ -z "$extra" ] || echo "$extra"
    "$MACHINE_PYTHON" -c 'import os, site, sysconfig
paths = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
for path in filter(os.path.isdir, dict.fromkeys(paths)):
    print(f"import site; site.addsitedir({path!r})")'
  } >"$site/gpu-check-machine.pth"
  "$MACHINE_PYTHON" -m pip install --isolated --quiet --disable-pip-version-check --no-index --no-deps \
    --no-compile --no-cache-dir "${WHEELS[@]/#/--find-links=}" --target "$site" "$@"
}

step() { echo; echo "== [$SECONDS s] $*"; }

step "the envs"
if [ "$DRY_RUN" = 0 ] && [ ! -d .gpu-wheels ]; then
  echo "FAILED: no .gpu-wheels/ here: run bash bench/gpu_prepare.sh where pip can download, and carry .gpu-wheels"
  exit 1
fi
if [ "$DRY_RUN" = 0 ] || { [ -d .gpu-wheels ] && [ -d .gpu-wheels-cpu ]; }; then
  echo "making them in $ENVS from $MACHINE_PYTHON and ${WHEELS[*]}"
  make_env base "$REPO" pyzmq dill &&
    make_env slicegpt "" transformers tokenizers huggingface-hub pyzmq dill ||
    { echo "FAILED to make the envs"; exit 1; }
  BASE_PYTHON=$ENVS/base/bin/python
  SLICEGPT_ENV=$ENVS/slicegpt
else
  echo "no prepared wheels (bash bench/gpu_prepare.sh): using .envs/base and .envs/slicegpt as they are"
  BASE_PYTHON=.envs/base/bin/python
  SLICEGPT_ENV=${SLICEBRIDGE_TEST_SLICEGPT_ENV:-$REPO/.envs/slicegpt}
fi
DRIVER=("$BASE_PYTHON" bench/gpu_check.py --env "$SLICEGPT_ENV" --out "$OUT_DIR" "$@")
[ "$DRY_RUN" = 0 ] || DRIVER+=(--dry-run)
"${DRIVER[@]}" --envs-only || { echo "FAILED: the envs do not import what they must"; exit 1; }

step "the tests marked gpu"
GPU_TESTS=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ' | sed 's/ $//')
TESTS_COMMAND="python -m pytest -m gpu -q -p no:cacheprovider $GPU_TESTS"
# shellcheck disable=SC2086  # the test files, one word each
SLICEBRIDGE_TEST_SLICEGPT_ENV=$SLICEGPT_ENV "$BASE_PYTHON" -m pytest -m gpu -q -p no:cacheprovider $GPU_TESTS \
  2>&1 | tee "$OUT_DIR/pytest.log"
TESTS_STATUS=${PIPESTATUS[0]}

step "bench/gpu_check.py"
"${DRIVER[@]}" --command "$INVOKED" --tests-log "$OUT_DIR/pytest.log" \
  --tests-status "$TESTS_STATUS" --tests-command "$TESTS_COMMAND"
STATUS=$?
rm -f "$OUT_DIR/pytest.log"  # quoted in gpu.md, and whole in gpu_check.log
step "done: $OUT_DIR/gpu.md (exit status $STATUS)"
exit "$STATUS"
