#!/usr/bin/env bash
# Create or update the project virtualenv: torch (2.13.0 unless one is already importable), the build tools,
# then gpuforge itself, editable, with its CUDA extension when nvcc is on PATH (GPUFORGE_BUILD_CUDA=0 skips it).
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: torch is importable by $PYTHON; the venv sees its site-packages"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip install --quiet)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" torch==2.13.0
fi
"${PIP[@]}" setuptools wheel "pybind11>=2.12" "cmake>=3.24"
"${PIP[@]}" --no-build-isolation -e ".[kernels,distributed,dev]"
"$VENV/bin/python" -c "import gpuforge; print('setup: gpuforge', gpuforge.__version__, 'installed in $VENV')"
