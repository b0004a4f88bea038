# Everything a fresh machine needs, from python3 and make alone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint typecheck unit demo bench test-browser clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,s3]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check batch_engine tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# Two test processes by default (CI machines have 2 cores); TEST_WORKERS=0 runs them in this one.
TEST_WORKERS ?= 2

unit: $(STAMP)
	$(BIN)/pytest -q -n $(TEST_WORKERS)

test: lint typecheck unit

# The demo job fails a few items on purpose (a content-policy prompt, simulated model failures), so the
# run's exit code is 1 ("finished with failed items"); only 2 and 3 mean the demo itself went wrong.
demo: $(STAMP)
	@$(BIN)/batch-engine run jobs/demo.yaml --simulate --out out/demo --fresh --yes; \
	code=$$?; if [ $$code -gt 1 ]; then exit $$code; fi; \
	echo "demo done: open out/demo/index.html (report: out/demo/report.yaml)"

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

test-browser: $(STAMP)
	$(BIN)/python -m tests.browser.run

clean:
	rm -rf $(VENV) out .mypy_cache .ruff_cache .pytest_cache
