#!/usr/bin/env bash
# GPU evidence in one device call: install the wheel built on the CPU machine (wheelhouse/, named
# in the device tool's `carry`) or build from source there, run the whole test suite on CUDA (all
# three backends), then the benchmarks. Results land in $OUT (env.txt, tests.log, bench.log,
# results.csv/json). TESTS (paths under tests/, default all), PYTEST_ARGS and BENCH_ARGS pass
# extra arguments through; SKIP_TESTS=1 / SKIP_BENCH=1 leave a part out. Benchmark-only extras
# (vector-quantize-pytorch and its dependencies, POT's cp312 wheel) install from
# wheelhouse/bench/*.whl if present. The multi-GPU run is separate: scripts/sinkhorn_nccl.py.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

if ls "$REPO"/wheelhouse/protokernels-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps --no-index --force-reinstall "$REPO"/wheelhouse/protokernels-*.whl
else
  $PY -m pip install -q --no-deps --no-build-isolation "$REPO"
fi || exit 1
if ls "$REPO"/wheelhouse/bench/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps --no-index "$REPO"/wheelhouse/bench/*.whl || exit 1
fi

cd /tmp  # not the repository root: the source tree must not shadow the installed package
$PY -c "import protokernels; [print(f'{k}: {v}') for k, v in protokernels.available_backends().items()]" 2>&1 | tee -a "$OUT/env.txt"
tests=0
if [ -z "${SKIP_TESTS:-}" ]; then
  paths=()
  for t in ${TESTS:-.}; do paths+=("$REPO/tests/$t"); done
  $PY -m pytest -q -p no:cacheprovider -m "not slow" "${paths[@]}" ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log"
  tests=${PIPESTATUS[0]}
fi
bench=0
if [ -z "${SKIP_BENCH:-}" ]; then
  $PY -m protokernels.bench --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
  bench=${PIPESTATUS[0]}
fi
echo "gpu_check: tests exit $tests, bench exit $bench"
exit $(( tests || bench ))
