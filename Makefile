# xprobe: install, demo, test, bench. A fresh clone needs nothing but Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xprobe-installed

.PHONY: install demo demo-data test bench lint clean

install: $(STAMP)

# Torch first, pinned and overridable (e.g. TORCH_SPEC="torch==2.5.1" for a CUDA build),
# so the project's "torch>=" requirement is already satisfied and pulls nothing else.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/xprobe demo

# Rebuild the demo's committed models and SAE (pipeline/demo/data) from the stdlib: ~15 min, 1 thread.
demo-data: install
	$(PY) -m pipeline.demo.build

# two pytest workers (pytest-xdist): the suite spends much of its time starting subprocesses
# and waiting on them, so two workers finish in ~2/3 of the time on a 2-core machine
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# SIZE=cpu (default, minutes here) or SIZE=gpu (an H100-class GPU; see pipeline/bench/__main__.py)
SIZE ?= cpu
bench: install
	$(PY) -m pipeline.bench --size $(SIZE)

lint: install
	$(VENV)/bin/ruff check pipeline stages tests
	$(VENV)/bin/ruff format --check pipeline stages tests

clean:
	rm -rf $(VENV) xprobe-demo .pytest_cache
