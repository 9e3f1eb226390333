# pagetrack: `make run` starts the daemon with a demo; `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit proto bench clean mutate kvm-rules

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m pagetrack.demo

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

proto: $(STAMP)
	$(BIN)/python proto/generate.py

bench: $(STAMP)
	$(BIN)/python bench/core.py
	$(BIN)/python bench/core_memory.py

# Not part of `make test`: every deliberate breakage of a KVM rule must fail a test.
mutate: $(STAMP)
	$(BIN)/python tools/mutate.py

kvm-rules: $(STAMP)
	$(BIN)/python tools/gen_kvm_rules.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
