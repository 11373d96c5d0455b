#!/bin/bash
# Assemble what the GPU checks need on a CUDA host that has Python 3.12 with PyTorch and
# no network: the wheels genserve adds to such an image, the configs and tokenizers of
# the shipped models (their weights are drawn there, see stand_in_models.py) and the
# SciFact claims the benchmark's prompts come from.
#   bash bench/gpu/kit.sh KIT_DIR      (run here, with the venv made by `make`)
#   bash bench/gpu/run.sh KIT_DIR "BENCH ARGS"   (run there, from the repository root)
set -eu
KIT=${1:?usage: kit.sh KIT_DIR}
VENV=${VENV:-.venv}
# genserve's runtime and the peer's (`transformers serve`) beside what such an image has.
PACKAGES="accelerate alembic amqp annotated-types anyio billiard celery click
  click-didyoumean click-plugins click-repl faiss-cpu fastapi gguf h11 httpcore httpcore2
  httpx httpx2 huggingface-hub idna importlib-metadata jiter kernels kombu lazy-importer
  mako openai opentelemetry-api prompt-toolkit pydantic pydantic-core pydantic-settings
  python-dotenv python-multipart redis sentence-transformers sniffio sqlalchemy starlette
  tomlkit transformers truststore typing-extensions typing-inspection tzlocal uvicorn vine
  wcwidth"
mkdir -p "$KIT/whl" "$KIT/smollm2" "$KIT/minilm/model"
KIT=$(cd "$KIT" && pwd)
for package in $PACKAGES; do
  version=$("$VENV/bin/pip" show "$package" 2>/dev/null | awk '/^Version/{print $2}')
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$KIT/whl" "$package==$version"
done
# The converted SmolLM2 folder (`make` and a first load build it) without its weights.
converted=.cache/models/smollm2-135m-instruct
"$VENV/bin/python" -c "from pathlib import Path; from models.backends.smollm2 import ensure_converted; from models.registry import get_spec; ensure_converted(get_spec('smollm2-135m-instruct'), cache_dir=Path('.cache/models'))"
find "$converted" -maxdepth 1 -type f ! -name 'model*.safetensors' ! -name genserve_conversion.json \
  -exec cp {} "$KIT/smollm2/" \;
minilm=$("$VENV/bin/python" -c "from models.backends.sentence import model_path; print(model_path())")
cp "$(dirname "$minilm")/__init__.py" "$KIT/minilm/"
(cd "$minilm" && find . ! -name model.safetensors -type f -exec cp --parents {} "$KIT/minilm/model/" \;)
"$VENV/bin/python" -c "from bench.scifact import data_dir; print(data_dir())" \
  | xargs -I{} cp {}/queries.jsonl "$KIT/"
du -sh "$KIT"
