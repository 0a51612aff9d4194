#!/usr/bin/env bash
# The one prepared device check, as run on a lent GPU machine (see README "On a GPU"): install the carried
# wheels (benchmarks/gpu_wheels.sh fetched them into .whl/), run the gpu-marked tests, then benchmarks/gpu.py.
# Results land in $OUT (the device tool brings them back) or benchmarks/results/ when OUT is unset.
#   device run: carry [".whl"], command "bash benchmarks/gpu_device.sh", timeout_s 570
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} AUTOFIT_CACHE=/tmp/autofit-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_device.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$out/gpu_device.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_benchmarks_gpu.py 2>&1 | tail -15 | tee "$out/gpu_tests.txt"
timeout 420 python3 -m autofit calibrate 2>&1 | tee "$out/gpu_calibrate.txt"
timeout 420 python3 -m benchmarks.gpu --out "$out" 2>&1 | tee "$out/gpu_log.txt"
