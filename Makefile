# Everything sets itself up on a fresh machine: a virtual env in the repo, torch when none is
# importable, the other packages, the build. `make demo` runs the main job, `make test` the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
# Optional extras: their tests skip without them, so an install that fails is not fatal.
OPTIONAL ?= matplotlib tqdm transformers accelerate peft galore-torch
DEMO_ARGS ?=
BENCH_ARGS ?=
NVCC := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
# With nvcc on the machine the CUDA kernels are built even against a CPU-only torch: there the
# build is the compile-and-link check of every .cu file (nothing built from them runs here).
LORENZA_KERNELS_CUDA ?= $(if $(NVCC),1,0)
export LORENZA_KERNELS_CUDA
PYTEST ?= $(PY) -m pytest -q -p no:cacheprovider

.PHONY: deps build test lint test-python test-triton check-cuda check-wheel demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: $(PY) pyproject.toml Makefile
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q numpy pytest pybind11 ninja "setuptools>=64" wheel triton ruff
	$(PIP) install -q $(OPTIONAL) || echo "make: optional packages ($(OPTIONAL)) not all installed; their tests skip"
	touch $@

deps: $(VENV)/.deps

# The extension is rebuilt only when a C++/CUDA source, the build files or the CUDA switch change
# (Python sources are installed in editable mode and need no build).
EXT_SOURCES := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml
BUILT := $(VENV)/.built-cuda$(LORENZA_KERNELS_CUDA)

$(BUILT): $(VENV)/.deps $(EXT_SOURCES)
	rm -f $(VENV)/.built-cuda*
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: deps $(BUILT)
	@ls lorenza_kernels/_C*.so >/dev/null 2>&1 || { rm -f $(BUILT); $(MAKE) --no-print-directory $(BUILT); }
	$(PY) -c "import lorenza_kernels as lk; import pprint; pprint.pprint(lk.backend_info())"

test: build
	$(MAKE) --no-print-directory lint test-python test-triton check-cuda check-wheel

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-python:
	$(PYTEST) tests

test-triton:
	TRITON_INTERPRET=1 $(PYTEST) -m triton_interpret tests

check-cuda:
	@if [ -n "$(NVCC)" ]; then PYTHON=$(abspath $(PY)) bash tests/check_nvcc.sh; else echo "check-cuda: no nvcc here, skipped"; fi

check-wheel: deps
	bash tests/check_wheel.sh "$(PY)"

demo: build
	$(PY) -m lorenza.demo $(DEMO_ARGS)

bench: build
	$(PY) bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf build dist *.egg-info lorenza_kernels/_C*.so $(VENV)/.built-cuda*
