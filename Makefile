# The two commands: `make demo` trains the default model; `make test` runs every test.
VENV ?= .venv
BIGTRAIN_DEPS ?= pinned
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bigtrain-installed
# Test files run in parallel (pytest-xdist), each file whole on one worker so its shared runs are made once.
TEST_WORKERS ?= 2

.PHONY: demo test test-latest pin setup clean models-page

setup: $(STAMP)

# Installs the pinned set (constraints.txt); BIGTRAIN_DEPS=latest installs the newest releases.
$(STAMP): pyproject.toml constraints.txt scripts/setup_env.sh
	VENV=$(VENV) BIGTRAIN_DEPS=$(BIGTRAIN_DEPS) bash scripts/setup_env.sh
	touch $(STAMP)

demo: setup
	$(VENV)/bin/bigtrain train --overwrite

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 tests

# The suite against the newest release of every dependency (torch excepted), in its own .venv-latest.
test-latest:
	$(MAKE) test VENV=.venv-latest BIGTRAIN_DEPS=latest

# After a green run: write constraints.txt from that environment (make pin VENV=.venv-latest).
pin:
	VENV=$(VENV) bash scripts/pin_deps.sh

# docs/models.md from the model-family matrix's measurements (tests/test_models.py).
models-page: setup
	mkdir -p runs
	BIGTRAIN_MATRIX_OUT=$(CURDIR)/runs/models-matrix.json $(VENV)/bin/pytest -q tests/test_models.py
	$(PY) scripts/models_table.py runs/models-matrix.json docs/models.md

clean:
	rm -rf runs .pytest_cache
