# Quickstart:  make demo   (simulated pods + proxy + autoscaler on loopback)
#              make test   (the full gate: format, lint, types, import rule, tests)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test check sim venv bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,ui]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/sdproxy demo

sim: venv
	$(BIN)/sdproxy sim

test: venv
	PATH="$(abspath $(BIN)):$$PATH" scripts/check

check: test

bench: venv
	$(BIN)/python -m bench all --quick

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
