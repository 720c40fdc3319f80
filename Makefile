# The two commands: `make demo` trains the default model; `make test` runs every test.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bigtrain-installed

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_env.sh
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $(STAMP)

demo: setup
	$(VENV)/bin/bigtrain train --overwrite

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q --durations=25 tests

clean:
	rm -rf runs .pytest_cache
