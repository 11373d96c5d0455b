#!/bin/bash
# genserve's GPU checks in one go, on a CUDA host with no network (see kit.sh): install
# the kit's wheels, draw the stand-in weights, run the decoding and engine tests on CUDA,
# optionally the in-process probe (PROBE=1), then bench.generate on CUDA.
#   bash bench/gpu/run.sh KIT_DIR "BENCH ARGS"    (from the repository root)
# Logs go to $OUT (default ./gpu-out).
set -u
KIT=${1:?usage: run.sh KIT_DIR "BENCH ARGS"}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Offline, so no hub kernels for any system (transformers would fetch them at load time).
export USE_HUB_KERNELS=0
SITE=/tmp/genserve-gpu-site
T0=$(date +%s)
stamp() { echo "=== $1 at +$(($(date +%s) - T0))s"; }
if [ ! -f "$SITE/.done" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$KIT"/whl/*.whl || exit 3
  # genserve itself, editable as `make` installs it (tests/service must not shadow it).
  python3 -m pip install -q --no-index --no-deps --no-build-isolation \
    --ignore-requires-python -e . || echo "editable install failed"
  touch "$SITE/.done"
fi
export PYTHONPATH=$SITE:$PWD
stamp installed
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" || exit 4
# bench.scifact reads the claims from ../shared/data/scifact.
mkdir -p ../shared/data/scifact && cp "$KIT/queries.jsonl" ../shared/data/scifact/ \
  && touch ../shared/data/scifact/corpus.jsonl || exit 5
[ -f .cache/models/smollm2-135m-instruct/genserve_conversion.json ] \
  || python3 bench/gpu/stand_in_models.py "$KIT" .cache/models "$SITE" || exit 6
stamp models
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  GENSERVE_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider \
    tests/models/test_decoding.py tests/workers/test_engine.py tests/models/test_select_device.py \
    2>&1 | tee "$OUT/tests.log" | tail -25
  stamp tests
fi
if [ "${PROBE:-0}" = 1 ]; then
  timeout 100 python3 bench/gpu/probe.py 2>&1 | grep --line-buffered -v "it/s\]\|arning" \
    | tee "$OUT/probe.log"
  stamp probe
fi
timeout "${BENCH_TIMEOUT:-420}" python3 -m bench.generate --device cuda --backends embedded \
  --logs "$OUT/logs" $2 2>&1 | grep --line-buffered -v "it/s\]" | tee "$OUT/bench.log" | tail -60
stamp bench
