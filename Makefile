# The two commands of the README: `make run` (the pipeline on the embedded default data)
# and `make test` (the test suite). Both create .venv and install the project first.
PYTHON ?= python3
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: run test install lint lock

# requirements/constraints.txt pins every package to the versions the suite last passed
# with; without it a fresh upstream release can send pip's resolver backtracking for hours.
$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	touch $@

# After a change to the dependencies in pyproject.toml: install, test, then record the set.
lock: $(VENV)/.installed
	{ sed -n '1,/^$$/p' requirements/constraints.txt; \
	  $(VENV)/bin/pip freeze --exclude-editable; } > requirements/constraints.txt.tmp
	mv requirements/constraints.txt.tmp requirements/constraints.txt
	touch $(VENV)/.installed

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

# The suite on this CPU's float path, in two processes (pytest-xdist: a test file stays on
# one, the files that start Ray share one; the end-to-end tests mostly wait on servers and
# subprocesses), then the tests that assert what a model learned or computed again on the
# other kind's path (bf16 where this CPU computes fp32 under `precision: auto`, fp32 where it
# computes bf16), so that CI holds on AMD and Intel alike.
test: lint
	pytest -n 2 --dist loadgroup
	pytest -m float_path --cpu-bf16 other
