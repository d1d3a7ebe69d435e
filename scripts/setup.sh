#!/usr/bin/env bash
# Set up protokernels from nothing: a virtual environment in .venv with torch and the test tools,
# then an editable build (with the CUDA extension when nvcc and a CUDA build of torch are present).
#
# Switches (environment variables):
#   PROTOKERNELS_CPU_ONLY=1  a CPU build of torch and no CUDA extension: no 3 GB CUDA torch, no
#                            nvcc needed (the reference backend, and Triton's interpreter in the
#                            tests)
#   TORCH_SPEC               the torch requirement (default torch==2.14.1; CPU-only: torch)
#   TORCH_INDEX_URL          the index to take torch from (CPU-only default:
#                            https://download.pytorch.org/whl/cpu; set it empty to use pip's
#                            configured index, e.g. a local wheel cache)
#   PROTOKERNELS_SKIP_CUDA=1 keep a CUDA torch but build without the extension
#   PYTHON                   the interpreter for the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
step() { echo "[setup $(date +%T)] $*"; }

if [ -n "${PROTOKERNELS_CPU_ONLY:-}" ]; then
  export PROTOKERNELS_SKIP_CUDA=1
  torch_spec=${TORCH_SPEC:-torch}
  index=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
else
  torch_spec=${TORCH_SPEC:-torch==2.14.1}
  index=${TORCH_INDEX_URL:-}
fi

[ -x .venv/bin/python ] || { step "virtual environment .venv ($PYTHON)"; "$PYTHON" -m venv .venv; }
step "torch ($torch_spec${index:+ from $index}): ~1.5 min from a local cache, longer downloading"
.venv/bin/python -m pip install -q --progress-bar off ${index:+--index-url "$index"} "$torch_spec"
# scikit-learn and matplotlib: examples/ (bundled digits data, PNGs) and their tests. POT and
# prototorch: the peer checks (the README's POT line, the LVQ losses); prototorch without its
# dependencies (torchvision, which breaks beside some torch builds): the tests load its loss
# functions only.
step "test and example tools"
.venv/bin/python -m pip install -q ninja numpy pytest setuptools wheel scikit-learn matplotlib POT
.venv/bin/python -m pip install -q --no-deps prototorch==0.7.6
start=$(date +%s)
if [ -n "${PROTOKERNELS_SKIP_CUDA:-}" ]; then
  step "protokernels, editable, without the CUDA extension"
else
  step "protokernels, editable, compiling the CUDA extension (~1.5 min on 2 cores)"
fi
# The build's progress: setup.py's own lines and ninja's [k/n] steps, one short line each.
.venv/bin/python -m pip install -v --no-build-isolation --no-deps -e . 2>&1 \
  | { grep --line-buffered -E "^protokernels:|^\[[0-9]+/[0-9]+\]" || true; } \
  | sed -u -E 's#^(\[[0-9]+/[0-9]+\]).* (-c|-o) [^ ]*/(csrc/[^ ]*).*#\1 \3#; s#^(\[[0-9]+/[0-9]+\]).*#\1#'
.venv/bin/python -c "import protokernels" || { echo "setup: protokernels does not import" >&2; exit 1; }
step "installed in $(( $(date +%s) - start )) s"
.venv/bin/python -c "
import protokernels
for name, status in protokernels.available_backends().items():
    print(f'  {name:<9} {status}')"
