#!/usr/bin/env bash
# The whole GPU job on a machine with a GPU and no network (its python must already hold torch, triton, cupy,
# numba-cuda, pybind11, cmake, pytest, nvidia-ml-py):
#   install  pip install --no-build-isolation --no-deps -e . (full log in OUTDIR/install.log), then assert that
#            the CUDA extension gpuforge._C imports; `gpuforge info` to OUTDIR/info.txt
#   tests    pytest -m gpu (OUTDIR/pytest_gpu.log)
#   bench    gpuforge bench all --report OUTDIR/bench (OUTDIR/bench.log), with a time budget
#   publish  copy OUTDIR/bench to profiling/results/<device-slug>/ and regenerate the README results section
# Usage: scripts/gpu_job.sh OUTDIR [--stage install|tests|bench|publish|all]... [--quick] [--time-budget SECONDS]
# Each stage fits one 10-minute command; run them one at a time where a command is time-limited, e.g.
#   scripts/gpu_job.sh out --stage install && scripts/gpu_job.sh out --stage tests
#   scripts/gpu_job.sh out --stage bench --quick && scripts/gpu_job.sh out --stage publish
# --quick benchmarks the speed targets' shapes only (about 50 cases) and is the one to use under a ~15-minute
# device budget. --time-budget (default 420 s) stops starting new benchmark cases once spent; the report lists
# what was left out. Every stage fails loudly: an install or build error stops the job with the log's tail.
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1
shift
STAGES=()
QUICK=()
BUDGET=420
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) STAGES+=("${2:?--stage needs a value}"); shift 2 ;;
    --quick) QUICK=(--quick); shift ;;
    --time-budget) BUDGET=${2:?--time-budget needs seconds}; shift 2 ;;
    -h|--help) usage ;;
    *) echo "gpu_job.sh: unknown argument $1" >&2; usage ;;
  esac
done
[ ${#STAGES[@]} -gt 0 ] || STAGES=(all)
if [ "${STAGES[*]}" = all ]; then STAGES=(install tests bench publish); fi

mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

stage_install() {
  echo "== install (log: $OUT/install.log)"
  if ! "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e . >"$OUT/install.log" 2>&1; then
    echo "gpu_job.sh: install failed; the end of $OUT/install.log:" >&2
    tail -n 60 "$OUT/install.log" >&2
    return 1
  fi
  # The CUDA backend is the point of a GPU run: a package that installed without its extension is a failure.
  if ! (cd "$OUT" && "$PYTHON" -c "import gpuforge._C as c; print('gpuforge._C built:', c.__file__)") \
      >>"$OUT/install.log" 2>&1; then
    echo "gpu_job.sh: gpuforge._C did not build or does not import (nvcc on PATH? GPUFORGE_BUILD_CUDA=0?):" >&2
    tail -n 30 "$OUT/install.log" >&2
    return 1
  fi
  tail -n 1 "$OUT/install.log"
  # informative only: an NVML hiccup must not stop the tests and benchmarks
  "$PYTHON" -m gpuforge info 2>&1 | tee "$OUT/info.txt" || echo "gpu_job.sh: gpuforge info failed (see info.txt)" >&2
}

stage_tests() {
  echo "== pytest -m gpu (log: $OUT/pytest_gpu.log)"
  "$PYTHON" -m pytest -m gpu -q -rs --durations=15 2>&1 | tee "$OUT/pytest_gpu.log"
}

stage_bench() {
  echo "== bench all ${QUICK[*]} --time-budget $BUDGET (log: $OUT/bench.log)"
  "$PYTHON" -m gpuforge bench all "${QUICK[@]}" --time-budget "$BUDGET" --report "$OUT/bench" 2>&1 \
    | tee "$OUT/bench.log"
}

stage_publish() {
  echo "== publish $OUT/bench to profiling/results/ and regenerate the README section"
  "$PYTHON" -m gpuforge.profiling.readme_results --publish "$OUT/bench"
}

failed=()
for stage in "${STAGES[@]}"; do
  case "$stage" in
    install) stage_install || { echo "gpu_job.sh: stopping: install failed" >&2; exit 1; } ;;
    tests|bench) "stage_$stage" || failed+=("$stage") ;;
    publish) [ -f "$OUT/bench/results.json" ] && stage_publish || failed+=(publish) ;;
    *) echo "gpu_job.sh: unknown stage $stage (install, tests, bench, publish, all)" >&2; exit 2 ;;
  esac
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_job.sh: failed stage(s): ${failed[*]}" >&2
  exit 1
fi
echo "gpu_job.sh: ${STAGES[*]} done"
