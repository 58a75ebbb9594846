# The two commands of the README: `make run` (the pipeline on the embedded default data)
# and `make test` (the test suite). Both create .venv and install the project first.
PYTHON ?= python3
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: run test install lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install
	noisy-student data fetch
	dvc commit --force --quiet data.dvc
	git diff --quiet data.dvc || (echo "data/ does not match data.dvc" >&2; exit 1)
	dvc repro
	noisy-student show

lint: install
	ruff check .
	ruff format --check .

test: lint
	pytest
