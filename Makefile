# The few targets the README names. `make test` works on a fresh machine: it builds .venv first.
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: all install test lint typecheck check dev bench soak

all: lint typecheck test

$(BIN)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy

check: lint typecheck

dev: install
	$(BIN)/fbhook dev

bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench

soak: install
	$(BIN)/python scripts/soak.py --seconds 60
