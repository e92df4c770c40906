# lars: make demo | make test | make test-fast | make bench | make lint | make format | make clean
# Every target creates the virtual environment (.venv) with Python >= 3.12 and
# installs what it needs. Override the interpreter with `make PYTHON=...`.

VENV      := .venv
VPY       := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
PYTEST_FLAGS ?= -n 2

.PHONY: all venv test test-fast lint format demo bench clean

all: test

$(VPY):
	@py="$$(PYTHON="$(PYTHON)" sh scripts/find_python.sh)" || exit 1; \
	echo "creating $(VENV) with $$py"; \
	"$$py" -m venv $(VENV)

# The native backend (lars.kernels.native): CMakeLists.txt builds its XLA FFI
# library into kernels/native/lib/ with the venv's jax headers. cmake and ninja
# come from PyPI when the machine has no cmake.
NATIVE_SRC := CMakeLists.txt $(wildcard kernels/native/*.cc kernels/native/*.h kernels/native/*.cu)

$(STAMP): pyproject.toml $(NATIVE_SRC) | $(VPY)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -e ".[test,demo,bench]"
	@cmake="$$(command -v cmake || true)"; \
	if [ -z "$$cmake" ]; then \
	  $(VPY) -m pip install cmake ninja && cmake="$(VENV)/bin/cmake"; \
	fi; \
	gen=""; if command -v ninja >/dev/null 2>&1 || [ -x "$(VENV)/bin/ninja" ]; then gen="-G Ninja"; fi; \
	if [ ! -f build/native/CMakeCache.txt ]; then \
	  PATH="$(CURDIR)/$(VENV)/bin:$$PATH" "$$cmake" -S . -B build/native $$gen \
	    -DPython3_EXECUTABLE="$(CURDIR)/$(VPY)" || exit 1; \
	fi; \
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" "$$cmake" --build build/native --parallel
	@touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Everything (what CI runs).
test: lint
	$(VPY) -m pytest $(PYTEST_FLAGS) tests

# The tests not marked slow: a few minutes on 2 cores.
test-fast: lint
	$(VPY) -m pytest $(PYTEST_FLAGS) -m "not slow" tests

demo: $(STAMP)
	$(VPY) -m examples.digits --quick
	$(VPY) -m bench --quick

bench: $(STAMP)
	$(VPY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
