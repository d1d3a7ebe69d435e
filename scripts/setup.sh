#!/usr/bin/env bash
# Set up protokernels from nothing: a virtual environment in .venv with torch and the test tools,
# then an editable build (with the CUDA extension when nvcc and a CUDA build of torch are present;
# PROTOKERNELS_SKIP_CUDA=1 skips it). TORCH_SPEC picks another torch (default torch==2.14.1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# scikit-learn and matplotlib: examples/ (bundled digits data, PNGs) and their tests.
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.14.1}" ninja numpy pytest setuptools \
  wheel scikit-learn matplotlib
start=$(date +%s)
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
echo "protokernels: installed in $(( $(date +%s) - start )) s"
.venv/bin/python -c "
import protokernels
for name, status in protokernels.available_backends().items():
    print(f'  {name:<9} {status}')"
