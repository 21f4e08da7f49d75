#!/bin/sh
# The whole lesson on the default model, in the order of examples/README.md: each concept, then the adapters
# (trained only where examples/adapters/ lacks them, since training takes minutes each), their scores, and the
# server part. Arguments (e.g. --threads 2) go to the concept and server programs. Run from the repository root.
set -eu
python=${PYTHON:-.venv/bin/python}
"$python" examples/kv_cache.py "$@"
"$python" examples/batching.py "$@"
"$python" examples/continuous_batching.py "$@"
"$python" examples/quantization.py "$@"
if [ ! -f examples/adapters/entities/adapter_model.safetensors ]; then
    "$python" examples/train_adapters.py
fi
"$python" examples/score_adapters.py
"$python" examples/multi_lora.py "$@"
"$python" examples/lesson_server.py "$@"
