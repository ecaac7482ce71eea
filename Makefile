# Quick start: `make demo` and `make test` on a fresh machine. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL_MIB ?= 1024
ARRAYS ?= 64
SITES ?= 2
ROUNDS ?= 3

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m bench.e2e --model-mib $(MODEL_MIB) --arrays $(ARRAYS) --sites $(SITES) \
	    --rounds $(ROUNDS) --json .demo/result.json

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .demo .pytest_cache .hypothesis
