#!/usr/bin/env bash
# GPU evidence in one device call: install protokernels, run the test suite on CUDA (all three
# backends) and the benchmarks. Results land in $OUT (env.txt, build.log, tests.log, bench.log,
# results.csv/json, sanitizer logs).
#
# INSTALL=source (default: build the extension from this tree against the machine's torch, which
#   proves the source build on that torch version) or wheel (the wheel built on the CPU machine,
#   wheelhouse/protokernels*.whl, named in the device tool's `carry`); INSTALL="wheel source"
#   installs the wheel, runs the tests, then builds from source and runs them again. The source
#   build uses /usr/bin/gcc and g++ where they exist (BUILD_CC / BUILD_CXX choose others).
# TESTS (file names under tests/, default all; one pytest process per file, JOBS (default 6) at a
#   time, each cut at TEST_TIMEOUT seconds), PYTEST_ARGS and BENCH_ARGS pass extra arguments
#   through; SKIP_TESTS=1 / SKIP_BENCH=1 leave a part out.
# FUZZ_CASES (default 200): cases per op of tests/test_fuzz.py (CI runs 12 on the CPU).
# SANITIZER=1: also run the CUDA and Triton backends' tests of SANITIZER_TESTS (default: the
#   files of every op with kernels) under compute-sanitizer's SANITIZER_TOOLS (default memcheck,
#   racecheck, initcheck), selected by SANITIZER_K (default "(cuda or triton) and not compile and
#   not 2_to_the_31"), each (tool, file) pair cut at SANITIZER_TIMEOUT seconds; a log ends in its
#   tool's error summary. SANITIZER_ARGS passes compute-sanitizer more arguments: with
#   "--kernel-name kns=hopper_search" it checks that kernel alone, and racecheck gets through a
#   test file in a fraction of the time.
# PACK=1 packs everything in $OUT into one logs archive at the end.
# Benchmark-only extras (vector-quantize-pytorch and its dependencies, POT's cp312 wheel) install
# from wheelhouse/bench/*.whl if present. The multi-GPU run is separate:
# scripts/sinkhorn_nccl.py.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PROTOKERNELS_FUZZ_CASES=${FUZZ_CASES:-200}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

if ls "$REPO"/wheelhouse/bench/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps --no-index "$REPO"/wheelhouse/bench/*.whl || exit 1
fi

install() {  # $1: source or wheel
  if [ "$1" = wheel ]; then
    # The distribution whose extension matches this torch's CUDA major (build_wheels.sh writes
    # protokernels_cu12, protokernels_cu13 and the pure protokernels side by side).
    local major=$($PY -c 'import torch; print(torch.version.cuda.split(".")[0])')
    $PY -m pip uninstall -q -y protokernels protokernels-cu12 protokernels-cu13 2>/dev/null
    $PY -m pip install -q --no-deps --no-index --force-reinstall \
      "$REPO"/wheelhouse/protokernels_cu"$major"-*.whl || return 1
  else
    local start=$(date +%s)
    # The system compilers where they exist: the H100 machine's default CC/CXX (a g++ wrapper
    # in /opt/gcc) builds an extension whose C++ exceptions crash the process (RESULTS.md "One
    # call for the VQ step"). BUILD_CC / BUILD_CXX pick others.
    local cc=${BUILD_CC:-$([ -x /usr/bin/gcc ] && echo /usr/bin/gcc || echo "${CC:-gcc}")}
    local cxx=${BUILD_CXX:-$([ -x /usr/bin/g++ ] && echo /usr/bin/g++ || echo "${CXX:-g++}")}
    CC=$cc CXX=$cxx MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install -v --no-deps --no-build-isolation \
      "$REPO" > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; return 1; }
    echo "source build against torch $($PY -c 'import torch; print(torch.__version__)'): $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt"
  fi
}

status=0
for mode in ${INSTALL:-source}; do
  install "$mode" || exit 1
  cd /tmp  # not the repository root: the source tree must not shadow the installed package
  $PY -m protokernels.info 2>&1 | tee -a "$OUT/env.txt"
  if [ -z "${SKIP_TESTS:-}" ]; then
    # One pytest process per test file, JOBS at a time on the one GPU: the suite runs in a
    # fraction of one process's time, and each file's log survives a time limit. Exit 5 (all of
    # a file's tests deselected, e.g. test_wheel.py's slow build) is not a failure.
    mkdir -p "$OUT/tests-$mode"
    (cd "$REPO/tests" && ls ${TESTS:-test_*.py}) | xargs -P "${JOBS:-6}" -I{} sh -c \
      "timeout ${TEST_TIMEOUT:-1500} $PY -m pytest -q -p no:cacheprovider -m 'not slow' \
         '$REPO/tests/{}' ${PYTEST_ARGS:-} > '$OUT/tests-$mode/{}.log' 2>&1 \
       || [ \$? -eq 5 ] || echo '{}' >> '$OUT/tests-$mode/failed.txt'"
    for log in "$OUT/tests-$mode"/*.log; do  # a file's last line: its pytest summary
      echo "$(basename "$log" .log): $(tail -1 "$log")"
    done | tee "$OUT/tests-$mode.log"
    if [ -s "$OUT/tests-$mode/failed.txt" ]; then
      echo "FAILED ($mode): $(tr '\n' ' ' < "$OUT/tests-$mode/failed.txt")"; status=1
      while read -r failed; do  # the failures' lines, for a device tool that returns few files
        grep -E "^(FAILED|ERROR)|^E  " "$OUT/tests-$mode/$failed.log" | head -20
      done < "$OUT/tests-$mode/failed.txt"
    fi
  fi
  cd "$REPO"
done

if [ -n "${SANITIZER:-}" ]; then
  cd /tmp
  # Every (tool, test file) pair side by side: each tool slows its process 10-100x, and the
  # machine has the cores and GPU memory for all 21. A pair cut off by SANITIZER_TIMEOUT reports
  # the errors it had printed so far ("=========" lines name each hazard as it happens).
  SANITIZER_DEFAULT_TESTS="test_sqdist.py test_nearest.py test_dw_nearest.py test_kp_conv.py
    test_codebook_lookup.py test_codebook_stats.py test_sinkhorn.py"
  selection=${SANITIZER_K:-(cuda or triton) and not compile and not 2_to_the_31}
  for tool in ${SANITIZER_TOOLS:-memcheck racecheck initcheck}; do
    for t in ${SANITIZER_TESTS:-$SANITIZER_DEFAULT_TESTS}; do
      ( timeout "${SANITIZER_TIMEOUT:-3000}" compute-sanitizer --tool "$tool" ${SANITIZER_ARGS:-} \
          --target-processes all --error-exitcode 99 $PY -m pytest -q -p no:cacheprovider \
          -m "not slow" "$REPO/tests/$t" -k "$selection" > "$OUT/sanitizer-$tool-$t.log" 2>&1
        echo $? > "$OUT/sanitizer-$tool-$t.exit" ) &
    done
  done
  wait
  hazard='^========= (Error|Warning|Invalid|Uninitialized)'  # how each tool starts a report
  for log in "$OUT"/sanitizer-*.log; do
    code=$(cat "${log%.log}.exit")
    echo "$(basename "$log" .log): exit $code, $(grep -cE "$hazard" "$log") hazard reports;" \
      "$(grep -E 'SUMMARY|passed|failed' "$log" | tail -2 | tr '\n' ' ')"
    [ "$code" = 0 ] || grep -m 5 -A1 -E "$hazard" "$log"
    status=$(( status || code ))
  done
  cd "$REPO"
fi

bench=0
if [ -z "${SKIP_BENCH:-}" ]; then
  cd /tmp
  $PY -m protokernels.bench --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
  bench=${PIPESTATUS[0]}
fi
if [ -n "${PACK:-}" ]; then  # for a device tool that brings back only a few files
  tar czf /tmp/gpu_check_logs.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/gpu_check_logs.tgz "$OUT/"
fi
echo "gpu_check: tests/sanitizer exit $status, bench exit $bench"
exit $(( status || bench ))
