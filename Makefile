# The two commands that matter on a fresh machine (each creates or reuses .venv itself):
#   make demo   - run the main job on the embedded tiny default (no downloads)
#   make test   - run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# Extras the tests install; CI adds tpu-aot (libtpu, ~700 MB) so the TPU compile tests run instead of skipping.
EXTRAS ?= test

.PHONY: demo test test-notebooks clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Stamps re-run the install when pyproject.toml changes.
$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.test-$(EXTRAS): pyproject.toml $(VENV)/.base
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

demo: $(VENV)/.base
	$(BIN)/chameleon-jax demo

# Two pytest workers (pytest-xdist), one per core here; each test file stays on one worker, so its
# module fixtures are built once.
test: $(VENV)/.test-$(EXTRAS)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# Second tier (CI runs it too): every notebook top to bottom in a fresh kernel, two at a time.
test-notebooks: $(VENV)/.test-$(EXTRAS)
	$(BIN)/python -m pytest -q -n 2 -m notebooks tests/test_notebooks.py

clean-venv:
	rm -rf $(VENV)
