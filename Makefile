# lars: make demo | make test | make bench | make lint | make format | make clean
# Every target creates the virtual environment (.venv) with Python >= 3.12 and
# installs what it needs. Override the interpreter with `make PYTHON=...`.

VENV      := .venv
VPY       := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
PYTEST_FLAGS ?= -n 2

.PHONY: all venv test lint format demo bench clean

all: test

$(VPY):
	@py="$$(PYTHON="$(PYTHON)" sh scripts/find_python.sh)" || exit 1; \
	echo "creating $(VENV) with $$py"; \
	"$$py" -m venv $(VENV)

$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -e ".[test,demo,bench]"
	@touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(VPY) -m pytest $(PYTEST_FLAGS) tests

demo: $(STAMP)
	$(VPY) -m examples.digits --quick
	$(VPY) -m bench --quick

bench: $(STAMP)
	$(VPY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
