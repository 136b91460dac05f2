# Two commands for a new user: `make demo` and `make test`. Both install into .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo demo-quick test lint clean

$(STAMP): setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dlip-ds demo --out demo_out

demo-quick: $(STAMP)
	$(BIN)/dlip-ds demo --quick --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check dlip_ds tests benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
