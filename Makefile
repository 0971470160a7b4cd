# The two commands that matter on a fresh machine (each creates or reuses .venv itself):
#   make demo   - run the main job on the embedded tiny default (no downloads)
#   make test   - run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Stamps re-run the install when pyproject.toml changes.
$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.base
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.base
	$(BIN)/chameleon-jax demo

test: $(VENV)/.test
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
