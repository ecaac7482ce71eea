# Quick start: `make demo` and `make test` on a fresh machine. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL_MIB ?= 1024
ARRAYS ?= 64
SITES ?= 2
ROUNDS ?= 3
TEST_WORKERS ?= 2  # pytest-xdist processes; a test file stays on one (its federation is shared)

.PHONY: install demo test bench-wan bench-path clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m bench.e2e --model-mib $(MODEL_MIB) --arrays $(ARRAYS) --sites $(SITES) \
	    --rounds $(ROUNDS) --json .demo/result.json

test: install  # the formatter and linter first: a style slip fails fast, before the suite
	$(VENV)/bin/ruff format --check --quiet .
	$(VENV)/bin/ruff check --quiet .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench-wan: install  # the seed's two distant sites over emulated links, uncompressed and int8 (root, gcc)
	$(PY) -m bench.wan --compare none,int8 --rounds 3 --json .demo/wan.json

bench-path: install  # one 100 ms / 1 Gbit/s / 0.1 % loss path: a default TCP stream against Hauler
	$(PY) -m bench.wan --scenario path --json .demo/path.json

clean:
	rm -rf $(VENV) .demo .pytest_cache .hypothesis
