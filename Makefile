# lars: make demo | make test | make test-fast | make test-jax-0.11 | make test-py3.13
#       | make bench | make lint
#       | make format | make docs | make wheel | make clean | make gpu-wheels | make gpu-check
#       | make gpu-check-cpu | make cuda-emulate | make gpu-compile
# Every target creates the virtual environment (.venv) with Python >= 3.12 and
# installs what it needs. Override the interpreter with `make PYTHON=...`.
#
# Installing is pip's: `pip install -e ".[test,demo,bench,docs]"` builds the native
# backend's library through CMakeLists.txt (the build backend, scikit-build-core,
# brings cmake and ninja from PyPI when the machine has none) into
# kernels/native/lib/, where the checkout loads it from. LARS_NATIVE_CUDA=ON/OFF
# forces the CUDA handler on or off (default: built when nvcc is found).

VENV      := .venv
VPY       := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
PYTEST_FLAGS ?= -n 2

# The oldest supported jax (the device images' 0.11.2), in a second venv.
JAX_OLD        := 0.11.2
VENV_OLD       := build/venv-jax-$(JAX_OLD)
VPY_OLD        := $(VENV_OLD)/bin/python
STAMP_OLD      := $(VENV_OLD)/.installed
# What `make test-jax-0.11` runs there: the reference, native, optax and
# braintools parity tests, and the GPU kernels' tests (interpreted, lowered and
# compiled for CUDA on the CPU) with the GPU check's harness and its profiler
# reading (bench/device_trace.py), since 0.11.2 is the jax of the GPU images
# (`make test-jax-0.11 TESTS_OLD=tests` runs them all).
TESTS_OLD ?= tests/test_backend_reference.py tests/test_backend_native.py tests/test_native.py \
	tests/test_native_api.py tests/test_native_ffi.py tests/test_optax_parity.py \
	tests/test_braintools_parity.py tests/test_pallas.py tests/test_pallas_backend_run.py \
	tests/test_pallas_fused.py tests/test_backend_pallas.py tests/test_triton.py \
	tests/test_triton_compiled.py tests/test_triton_versions.py tests/test_gpu_check.py \
	tests/test_gpu_check_report.py tests/test_gpu_check_quarantine.py tests/test_device_trace.py

# jaxlib's CUDA Triton extension comes with its CUDA plugin (8 MB; without
# its dependencies or the PJRT plugin it loads on a machine without a GPU, and
# jax keeps to the CPU): there test_triton_compiled.py lowers the Triton step
# for CUDA through the extension the GPU uses, not a stand-in.
CUDA_PLUGIN_OLD := jax-cuda13-plugin==$(JAX_OLD)

# The newest Python this machine has beside 3.12 (3.13), in a third venv with
# the newest jax: the tests of TESTS_NEW_PY (`make test-py3.13 TESTS_NEW_PY=tests`
# runs them all).
PY_NEW         := 3.13
VENV_NEW       := build/venv-py$(PY_NEW)
VPY_NEW        := $(VENV_NEW)/bin/python
STAMP_NEW      := $(VENV_NEW)/.installed
TESTS_NEW_PY ?= tests/test_backend_reference.py tests/test_backend_native.py tests/test_native_api.py \
	tests/test_optax_parity.py tests/test_braintools_parity.py tests/test_optax_dropin.py \
	tests/test_braintools_dropin.py tests/test_schedules.py tests/test_validation.py \
	tests/test_checkpoint.py tests/test_nonfinite.py tests/test_triton.py tests/test_pallas.py

NATIVE_SRC := CMakeLists.txt $(wildcard kernels/native/*.cc kernels/native/*.h kernels/native/*.cu kernels/native/*.cuh)

.PHONY: all venv test test-fast test-jax-0.11 test-py3.13 lint format demo bench docs wheel clean \
	gpu-wheels gpu-check gpu-check-cpu cuda-emulate gpu-compile

all: test

# $(call make-venv,DIR): creates DIR with Python >= 3.12.
define make-venv
	@py="$$(PYTHON="$(PYTHON)" sh scripts/find_python.sh)" || exit 1; \
	echo "creating $(1) with $$py"; \
	"$$py" -m venv $(1)
endef

# $(call install,PYTHON,EXTRA PIP ARGUMENTS): the editable install, native built in place.
# The distribution was called `lars` before it became `jax-lars`: an old
# editable install of it is removed first.
define install
	$(1) -m pip install --upgrade pip
	$(1) -m pip uninstall -y -q lars 2>/dev/null || true
	$(1) -m pip install -e ".[test,demo,bench,docs]" $(2)
	@echo "native library (kernels/native/lib/build-info.txt):"; sed 's/^/  /' kernels/native/lib/build-info.txt
endef

$(VPY):
	$(call make-venv,$(VENV))

$(STAMP): pyproject.toml $(NATIVE_SRC) | $(VPY)
	$(call install,$(VPY))
	@touch $(STAMP)

venv: $(STAMP)

$(VPY_OLD):
	$(call make-venv,$(VENV_OLD))

$(STAMP_OLD): pyproject.toml $(NATIVE_SRC) | $(VPY_OLD)
	$(call install,$(VPY_OLD),"jax==$(JAX_OLD)" "jaxlib==$(JAX_OLD)")
	$(VPY_OLD) -m pip install --no-deps $(CUDA_PLUGIN_OLD)
	@touch $(STAMP_OLD)

$(VPY_NEW):
	@py="$$(PYTHON_MINOR=$(subst 3.,,$(PY_NEW)) sh scripts/find_python.sh)" || exit 1; \
	echo "creating $(VENV_NEW) with $$py"; \
	"$$py" -m venv $(VENV_NEW)

$(STAMP_NEW): pyproject.toml $(NATIVE_SRC) | $(VPY_NEW)
	$(call install,$(VPY_NEW))
	@touch $(STAMP_NEW)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Everything on the newest jax the pins allow (what CI runs first).
test: lint
	@$(VPY) -c "import jax; print('jax', jax.__version__)"
	$(VPY) -m pytest $(PYTEST_FLAGS) tests

# The tests not marked slow: a few minutes on 2 cores.
test-fast: lint
	$(VPY) -m pytest $(PYTEST_FLAGS) -m "not slow" tests

# The oldest supported jax, in its own venv (CI runs it after `make test`).
test-jax-0.11: $(STAMP_OLD)
	@$(VPY_OLD) -c "import jax; print('jax', jax.__version__)"
	LARS_REQUIRE_CUDA_TRITON_EXTENSION=1 $(VPY_OLD) -m pytest $(PYTEST_FLAGS) $(TESTS_OLD)

# A newer Python, in its own venv (CI runs it last, where the machine has one).
test-py$(PY_NEW): $(STAMP_NEW)
	@$(VPY_NEW) -c "import sys, jax; print('python', sys.version.split()[0], 'jax', jax.__version__)"
	$(VPY_NEW) -m pytest $(PYTEST_FLAGS) $(TESTS_NEW_PY)

demo: $(STAMP)
	$(VPY) -m examples.digits --quick
	$(VPY) -m bench --quick

bench: $(STAMP)
	$(VPY) -m bench

# The API reference and the README as HTML pages, in build/docs/html (Sphinx;
# warnings are errors, every cross-reference must resolve). `make test` builds
# them too (tests/test_docs.py); the examples in the docstrings run as
# doctests in tests/test_doctests.py.
docs: $(STAMP)
	$(VPY) -m sphinx -W --keep-going -b html docs build/docs/html
	@echo "API reference: build/docs/html/index.html"

# The GPU validation (docs/gpu-check.md). `make gpu-wheels` (here, with a
# network) downloads into .whl/ the pure-Python wheels the GPU image lacks;
# `make gpu-check` (there, no venv: the image's python3) installs them, builds
# the CUDA handler and checks and times every GPU backend;
# `make gpu-check-cpu` runs the same harness with the interpreted kernels.
GPU_WHEELS ?= jax-triton==0.3.1
GPU_PYTHON ?= python3
GPU_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64

gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(VPY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)
	@ls -l .whl

gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m bench.gpu_check

gpu-check-cpu: $(STAMP)
	$(VPY) -m bench.gpu_check --cpu

# The CUDA handler's kernels run on the CPU against a scalar reference (needs a
# C++20 compiler and the CUDA toolkit's headers; no GPU): bench/cuda_emulate.py.
cuda-emulate:
	$(or $(PYTHON),python3) -m bench.cuda_emulate

# Every GPU step compiled for an H200 without a GPU (XLA's deviceless
# compilation, bench/gpu_compile.py): the launches XLA makes of each, checked
# against their bounds. Its own venv holds the GPU image's jax with the CUDA 13
# plugins (about 1 GB) and jax-triton; the CUDA handler is built for that jax
# into build/gpu-compile/lib (needs nvcc). GPU_COMPILE_FLAGS=--quick: the
# bounded rows only (CI); GPU_COMPILE_FLAGS="--out DIR": the JSON and Markdown.
VENV_GPUC      := build/venv-gpu-compile
VPY_GPUC       := $(VENV_GPUC)/bin/python
STAMP_GPUC     := $(VENV_GPUC)/.installed
GPUC_LIB       := build/gpu-compile/lib
GPU_COMPILE_FLAGS ?=
GPUC_PACKAGES  := "jax==$(JAX_OLD)" "jaxlib==$(JAX_OLD)" "jax-cuda13-plugin==$(JAX_OLD)" \
	"jax-cuda13-pjrt==$(JAX_OLD)" "optax==0.2.8" "numpy>=1.26" $(GPU_WHEELS) "triton==3.6.0"

$(VPY_GPUC):
	$(call make-venv,$(VENV_GPUC))

$(STAMP_GPUC): pyproject.toml $(NATIVE_SRC) | $(VPY_GPUC)
	$(VPY_GPUC) -m pip install --upgrade pip
	$(VPY_GPUC) -m pip install $(GPUC_PACKAGES)
	cmake -S . -B build/gpu-compile/cmake -DPython3_EXECUTABLE=$(abspath $(VPY_GPUC)) \
		-DLARS_NATIVE_CPU=OFF -DLARS_NATIVE_CUDA=ON -DLARS_NATIVE_OUTPUT_DIR=$(abspath $(GPUC_LIB))
	cmake --build build/gpu-compile/cmake
	@touch $(STAMP_GPUC)

gpu-compile: $(STAMP_GPUC)
	LARS_GPU_COMPILE_LIB=$(abspath $(GPUC_LIB)) $(VPY_GPUC) -m bench.gpu_compile $(GPU_COMPILE_FLAGS)

# A wheel of jax-lars in dist/ (native library inside).
wheel: $(STAMP)
	$(VPY) -m pip wheel --no-deps -w dist .

clean:
	rm -rf $(VENV) build dist kernels/native/lib *.egg-info .pytest_cache .ruff_cache
