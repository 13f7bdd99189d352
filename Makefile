# Quick start: `make bench` (set up + the main job) and `make test` (set up + the whole test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

# The lent GPU machine's software, in a second venv: `make test-gpu-env` runs the tiers of the suite that need no GPU
# (import, opcheck, the Triton interpreter, eager) against exactly those versions, so a GPU session does not find an
# API break first. pyproject.toml's floors must equal these (tests/test_versions.py).
GPU_VENV ?= .venv-gpu
GPU_PYTHON_VERSION := 3.12
GPU_TORCH := 2.11.0
GPU_TORCHVISION := 0.26.0
GPU_TRITON := 3.6.0
# GPU_PYTHON: a Python $(GPU_PYTHON_VERSION) to create the venv with (found if not given, see setup-gpu-env)
GPU_PYTHON ?=
# The tier (import, opcheck, interpreter, eager) sized to ~15 minutes on 2 cores with the set-up; the rest of
# tests/triton and tests/ops run in `make test` (the same code, other versions)
GPU_TESTS ?= tests/test_import.py tests/test_versions.py tests/triton/test_triton_registration.py \
  tests/triton/test_triton_scale_add_relu.py tests/triton/test_triton_bn_relu_conv.py \
  tests/triton/test_triton_conv_bn_relu.py tests/ops/test_cpu_backend.py tests/ops/test_dispatch.py \
  tests/ops/test_batchnorm_semantics.py tests/nn/test_timm_preact.py

.PHONY: setup bench test test-fast lint info cmake clean setup-gpu-env test-gpu-env

setup:
	RESFAST_VENV=$(VENV) bash scripts/setup.sh

bench: setup
	$(PY) -m resfast.bench $(ARGS)

test: setup
	$(PY) -m pytest tests $(ARGS)

# day-to-day: the suite without the tests marked slow (whole models, interpreter gradcheck/opcheck and multi-step
# training, benchmark and GPU-check runs, AOT compiles); a few minutes on 2 cores. CI runs `make test`.
test-fast: setup
	$(PY) -m pytest tests -m "not slow" $(ARGS)

lint: setup
	$(PY) -m ruff check resfast tests benchmarks setup.py

info: setup
	$(PY) -m resfast.info

# C++ development build (compile_commands.json + the C++ test), from the same csrc/sources.txt
cmake: setup
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DPython3_EXECUTABLE=$(abspath $(PY)) -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cmake -j 2
	cd build/cmake && ctest --output-on-failure

# Python $(GPU_PYTHON_VERSION) for a new $(GPU_VENV): GPU_PYTHON if set, else the first of python$(GPU_PYTHON_VERSION) on
# PATH, pyenv's installs ($$PYENV_ROOT or ~/.pyenv, newest first) and /usr/local/bin, /usr/bin that runs and is
# that version (a pyenv shim on PATH fails unless PYENV_VERSION is set: it is skipped then).
setup-gpu-env:
	@pyv() { "$$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }; \
	if [ -x $(GPU_VENV)/bin/python ]; then \
	  py=$(GPU_VENV)/bin/python; \
	  if [ "$$(pyv $$py)" != "$(GPU_PYTHON_VERSION)" ]; then \
	    echo "make setup-gpu-env: $(GPU_VENV) exists but its Python is not $(GPU_PYTHON_VERSION); remove it" >&2; exit 1; \
	  fi; \
	else \
	  py=; for c in $(GPU_PYTHON) python$(GPU_PYTHON_VERSION) \
	      $$(ls -d "$${PYENV_ROOT:-$$HOME/.pyenv}"/versions/$(GPU_PYTHON_VERSION).*/bin/python$(GPU_PYTHON_VERSION) \
	         2>/dev/null | sort -rV) \
	      /usr/local/bin/python$(GPU_PYTHON_VERSION) /usr/bin/python$(GPU_PYTHON_VERSION); do \
	    if [ "$$(pyv "$$c")" = "$(GPU_PYTHON_VERSION)" ]; then py=$$c; break; fi; \
	  done; \
	  if [ -z "$$py" ]; then \
	    echo "make setup-gpu-env: no working Python $(GPU_PYTHON_VERSION) found (tried GPU_PYTHON, python$(GPU_PYTHON_VERSION) on PATH, pyenv's versions/$(GPU_PYTHON_VERSION).*, /usr/local/bin, /usr/bin); install one or pass GPU_PYTHON=/path/to/python$(GPU_PYTHON_VERSION)" >&2; \
	    exit 1; \
	  fi; \
	fi; \
	echo "== make setup-gpu-env: $(GPU_VENV) with $$py: torch $(GPU_TORCH), torchvision $(GPU_TORCHVISION), triton $(GPU_TRITON)"; \
	RESFAST_VENV=$(GPU_VENV) PYTHON="$$py" RESFAST_TORCH=$(GPU_TORCH) RESFAST_TORCHVISION=$(GPU_TORCHVISION) \
	  RESFAST_TRITON=$(GPU_TRITON) bash scripts/setup.sh

test-gpu-env: setup-gpu-env
	RESFAST_GPU_ENV=1 $(GPU_VENV)/bin/python -m pytest $(GPU_TESTS) $(ARGS)

clean:
	rm -rf build resfast/_C*.so csrc/build_config.h
