# pagetrack: `make run` starts the daemon with a demo; `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit proto bench clean tools mutate kvm-rules

# npm packages the tests run, each pinned by its committed lockfile.
NPM_DIRS := tools/buf examples/node examples/export/node

# The install is editable and path-based (hatchling writes a .pth naming client/ and
# server/), so mypy and IDEs see the packages from a user's own scripts too.
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

tools: $(NPM_DIRS:%=%/node_modules/.package-lock.json)

%/node_modules/.package-lock.json: %/package-lock.json
	cd $* && npm ci --no-audit --no-fund --loglevel=error

unit: $(STAMP) tools
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
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache $(NPM_DIRS:%=%/node_modules)
