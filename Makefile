# The two commands of the README. Each sets itself up on a fresh machine (a virtualenv under .venv, torch,
# the project with its CUDA extension when nvcc exists) and is quick when already set up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gpuforge-installed
PYTEST_ARGS ?=

.PHONY: setup demo test
setup: $(STAMP)

$(STAMP): setup.py pyproject.toml CMakeLists.txt scripts/setup_env.sh $(wildcard csrc/*)
	PYTHON=$(PYTHON) bash scripts/setup_env.sh $(VENV)
	touch $@

demo: setup
	$(PY) -m gpuforge demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)
