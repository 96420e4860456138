# Developer entry points. `make demo` and `make test` set everything up on a fresh machine (a virtual
# environment, torch, the extension build), then run the end-to-end demo or the test suite; CI runs
# `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pip's local-index configuration on these machines warns about every missing mirror folder.
QUIET_PIP := sed "/is ignored: it is neither a file nor a directory/d"

.PHONY: deps install test demo cmake-build bench gpu-check clean

deps: $(VENV)/.deps-installed

$(VENV)/.deps-installed: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt 2>&1 | $(QUIET_PIP)
	touch $@

install: deps
	$(PY) -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | $(QUIET_PIP)
	$(PY) -m glm_ext info

test: install
	$(PY) -m pytest python_tests

# End to end on the CPU in a few minutes: train a small GLM on Python's own documentation, then fill
# blanks in held-out sentences (everything goes to ./glm-demo; a second run reuses it). The extension is
# built only when it is missing or older than its sources, and without the CUDA kernels where no GPU
# is visible (the demo then runs on the CPU, and compiling the CUDA kernels is most of a build's
# minutes); GLM_EXT_CUDA=auto or 1 overrides that.
DEMO_CUDA = $$($(PY) -c 'import torch; print("auto" if torch.cuda.is_available() else 0)')

demo: deps
	@so=$$(ls glm_ext/_C*.so 2>/dev/null | head -1); \
	if [ -z "$$so" ] || [ -n "$$(find csrc setup.py -newer "$$so" -type f | head -1)" ]; then \
	  GLM_EXT_CUDA=$${GLM_EXT_CUDA:-$(DEMO_CUDA)} $(MAKE) --no-print-directory install; \
	fi
	$(PY) -m glm_ext demo

# The same extension through CMake (compile_commands.json for IDEs and C++ tooling).
cmake-build: deps
	cmake -S . -B build-cmake -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY))
	cmake --build build-cmake

bench: install
	$(PY) benchmarks/bench_position_ops.py

# On a lent GPU machine: build, CUDA tests, compute-sanitizer, benchmarks (see the script).
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build build-cmake *.egg-info glm_ext/*.so
