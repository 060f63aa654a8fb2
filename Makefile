# Two commands do everything: `make demo` (install, then sample from the shipped model)
# and `make test`. Both install into a local virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# the CPU build of torch first, so that `torch>=2.3` is already met (a bare `torch` pulls a CUDA build);
	@# --no-compile: Python compiles what it imports on first use, instead of all of torch now
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --no-compile torch==2.13.0
	$(PY) -m pip install -q --no-compile -e .
	touch $(STAMP)

# the test tools (pytest, ruff, diffusers for the interop tests, selenium for the browser test):
# only `make test` needs them, so `make demo` stays a small install
$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-compile -e ".[dev]"
	touch $(DEV_STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/difflab demo --out out/demo

test: $(DEV_STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -n 2 --durations=15

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: install
	$(PY) benchmarks/samplers.py
	$(PY) benchmarks/nets.py
	$(PY) benchmarks/digits.py

# mutation testing of the core (not in CI: an hour or more on 2 cores); MUTATE="--module ema --workers 2" narrows it
.PHONY: mutate
mutate: install
	$(PY) -m pip install -q -e ".[dev,mutate]"
	$(PY) benchmarks/mutation.py $(MUTATE)

clean:
	rm -rf $(VENV) out .pytest_cache
