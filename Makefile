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

# Two lanes, two pytest workers (pytest-xdist). `make test`: the fast lane, every test not
# marked slow. `make test-slow`: the slow lane (SIGKILL/resume, segmented runs, clusters, the
# newcomer path, the demo). `make test-all` (CI, .ci/run): both, one after the other.
TEST_WORKERS ?= 2
.PHONY: test-slow test-all
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

test-slow: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m slow

test-all: test test-slow

# SIZE=cpu (default, minutes here) or SIZE=gpu (an H100-class GPU; see pipeline/bench/__main__.py)
SIZE ?= cpu
bench: install
	$(PY) -m pipeline.bench --size $(SIZE)

lint: install
	$(VENV)/bin/ruff check pipeline stages tests
	$(VENV)/bin/ruff format --check pipeline stages tests

clean:
	rm -rf $(VENV) xprobe-demo .pytest_cache
