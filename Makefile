# Two commands do all set-up on a fresh machine (see README):
#   make serve   install, then serve the shipped default model on http://127.0.0.1:8000
#   make test    install what the tests need, then run the whole test suite
# The install pins torch to the CPU build listed in constraints.txt; the package
# itself accepts a range, so GPU hosts can install a CUDA build instead.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-test serve test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# setuptools prints a banner on every editable install ("be careful with folders ... of the
# same name"): the package's folders are those, on purpose.
PIP_INSTALL = PYTHONWARNINGS='ignore:Editable installation' $(BIN)/python -m pip install --quiet

install: $(BIN)/python
	$(PIP_INSTALL) -c constraints.txt -e .

install-test: $(BIN)/python
	$(PIP_INSTALL) -c constraints.txt -e '.[test]'

serve: install
	$(BIN)/vaebm serve

test: install-test
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q
