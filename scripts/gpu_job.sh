#!/usr/bin/env bash
# The whole GPU job in one go, on a machine with a GPU and no network (its python must already hold torch,
# triton, cupy, numba-cuda, pybind11, cmake, pytest): install gpuforge with its CUDA extension, run the GPU
# tests, then the full benchmark suite with its report. Usage: scripts/gpu_job.sh OUTDIR
set -uo pipefail
OUT=${1:?usage: scripts/gpu_job.sh OUTDIR}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
"$PYTHON" -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3 | tee "$OUT/install.log"
"$PYTHON" -m gpuforge info | tee "$OUT/info.txt"
"$PYTHON" -m pytest -m gpu -q -rs 2>&1 | tee "$OUT/pytest_gpu.log"
tests_rc=${PIPESTATUS[0]}
"$PYTHON" -m gpuforge bench all --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests exit $tests_rc, bench exit $bench_rc"
exit $(( tests_rc || bench_rc ))
