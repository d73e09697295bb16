#!/usr/bin/env bash
# The CPU test suite under the GPU machine's versions (torch 2.11.0, torchvision 0.26.0,
# triton 3.6.0, no DALI), in a throwaway virtual environment and clone, so the project's own
# environment stays as it is. The code must run there unchanged; this finds out before device
# time is spent on it. The first run downloads about 3 GB from the package index (torch 2.11
# and its CUDA libraries); the environment is kept for the next run.
#
#   bash bench/compat_check.sh [pytest args]      # the committed state of this clone (HEAD)
#   VENV=/tmp/fs-compat TORCH=2.11.0 TV=0.26.0 TRITON=3.6.0 bash bench/compat_check.sh tests/test_info_nce.py
set -eu
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-/tmp/fs-compat}"
TORCH="${TORCH:-2.11.0}" TV="${TV:-0.26.0}" TRITON="${TRITON:-3.6.0}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# numpy < 2.4: triton 3.6's interpreter calls int() on one-element arrays (a loop bound passed
# to a helper), which numpy 2.4 refuses; triton 3.8's does not. Only the CPU simulation needs it.
"$VENV/bin/pip" install -q "torch==$TORCH" "torchvision==$TV" "triton==$TRITON" "numpy<2.4" \
    pillow tqdm matplotlib scikit-learn pytest pytest-benchmark scipy tensorboard
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
git clone -q "$REPO" "$WORK/repo"
"$VENV/bin/pip" install -q --no-deps -e "$WORK/repo"
cd "$WORK/repo"
"$VENV/bin/python" -c "import torch, triton, torchvision; print('torch', torch.__version__, 'triton', triton.__version__, 'torchvision', torchvision.__version__)"
# The interpreter's numpy warnings (the same deprecation, thousands of lines) are not ours.
"$VENV/bin/python" -m pytest --benchmark-disable -q -p no:cacheprovider -W ignore::DeprecationWarning "$@"
