#!/usr/bin/env bash
# Compile every csrc/ file against the headers of the OLDEST torch the package supports (2.10),
# object files only, for one architecture. The wheel is built against a newer torch, whose headers
# can hide a stable-ABI API that 2.10 lacks (STD_CUDA_KERNEL_LAUNCH_CHECK did, and every source
# build on torch 2.11 failed). Compiling against 2.10's headers catches that on a machine without
# a GPU; linking needs nothing more, since the stable ABI's symbols come from those headers' shim.
#
# Takes ~20 s to fetch the torch 2.10 wheel (915 MB, only its include/ is unpacked) and ~80 s to
# compile on 2 cores. OLDEST_TORCH picks another version; TORCH_HEADERS an include/ folder already
# unpacked (then nothing is downloaded).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${OLDEST_TORCH:-2.10.0}
nvcc=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
headers=${TORCH_HEADERS:-}
if [ -z "$headers" ]; then
  echo "check_oldest_torch: fetching torch $version's wheel for its headers"
  # Any CPython tag will do: the headers are the same in every wheel of a release.
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 -d "$work" "torch==$version"
  unzip -q "$work"/torch-*.whl 'torch/include/*' -d "$work"
  rm "$work"/torch-*.whl
  headers=$work/torch/include
fi
start=$(date +%s)
status=0
for source in csrc/*.cu csrc/*.cpp; do
  if ! "$nvcc" -c -std=c++17 --expt-relaxed-constexpr -DTORCH_TARGET_VERSION=0x020a000000000000 \
      -DUSE_CUDA -DPROTOKERNELS_BUILD=header_check -I"$headers" \
      -gencode=arch=compute_80,code=sm_80 "$source" -o "$work/object.o"; then
    echo "check_oldest_torch: $source does not compile against torch $version's headers" >&2
    status=1
  fi
done
echo "check_oldest_torch: csrc/ against torch $version's headers: $([ $status = 0 ] && echo ok || echo FAILED) ($(( $(date +%s) - start )) s)"
exit $status
