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

# Vega, Vega-Lite and Vega-Embed from the npm registry, inlined into the page template
# `dvc plots show` uses (.dvc/config), so plots draw without internet.
plots/offline.html: $(VENV)/.installed plots/package.json plots/package-lock.json plots/offline_template.py
	npm ci --prefix plots --no-audit --no-fund --silent
	$(VENV)/bin/python plots/offline_template.py

install: $(VENV)/.installed plots/offline.html

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
