#!/usr/bin/env bash
# The GPU check, run on a lent device machine in one call (see docs/benchmarks.md, "On a GPU"):
#   run(command="bash pipeline/bench/device_check.sh", carry=[".device-wheels"], timeout_s=560)
# The device's python3 has CUDA torch and transformers and reaches no package index, so the
# project's other needs travel as wheels in .device-wheels/ (`make device-wheels` here) and are
# installed with --target beside it, never over its torch. Each step is independent and
# time-boxed; everything it prints lands in $OUT (environment, test log, bench JSON).
set -u
OUT=${OUT:-/tmp/xprobe-device-out}
mkdir -p "$OUT"
SITE=/tmp/xprobe-site
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
step() { echo "== $1 ($(date +%T))"; }

step "environment" | tee "$OUT/env.txt"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
  python3 - <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
for name in ["torch", "transformers", "tokenizers", "safetensors", "numpy", "zarr", "numcodecs",
             "dask", "distributed", "sae_lens", "transformer_lens", "click", "pandas", "pyarrow",
             "datasets", "matplotlib", "sklearn", "pytest", "xdist", "gguf"]:
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"{name} MISSING ({type(e).__name__})")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
} 2>&1 | tee -a "$OUT/env.txt"

if [ -d .device-wheels ]; then
  step "install carried wheels" | tee "$OUT/install.txt"
  # --no-deps: only what was carried, so the device's own torch/transformers stay as they are
  timeout 120 python3 -m pip install -q --no-index --no-deps --target "$SITE" .device-wheels/*.whl \
    >>"$OUT/install.txt" 2>&1 || echo "some wheels did not install (see install.txt)"
fi

step "fitter bench (d 2304, F 16,384 and F 1,048,576)"
timeout 200 python3 -m pipeline.bench --size gpu --only fit --out "$OUT/bench-gpu-fit.json" \
  >"$OUT/bench-fit.log" 2>&1; echo "rc $?"; tail -c 1500 "$OUT/bench-fit.log"

step "GPU tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -x -rs \
  >"$OUT/test-gpu.log" 2>&1; echo "rc $?"; tail -20 "$OUT/test-gpu.log"

step "extraction and features bench"
timeout 200 python3 -m pipeline.bench --size gpu --only activations features \
  --out "$OUT/bench-gpu-extract.json" >"$OUT/bench-extract.log" 2>&1; echo "rc $?"
tail -c 1500 "$OUT/bench-extract.log"
step "done"
