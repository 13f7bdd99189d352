# Quick start: `make bench` (set up + the main job) and `make test` (set up + the whole test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup bench test lint info cmake clean

setup:
	RESFAST_VENV=$(VENV) bash scripts/setup.sh

bench: setup
	$(PY) -m resfast.bench $(ARGS)

test: setup
	$(PY) -m pytest tests $(ARGS)

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

clean:
	rm -rf build resfast/_C*.so csrc/build_config.h
