#!/usr/bin/env bash
# The project's test command (README): lint, then the whole suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
export COARS_DATA_DIR="${COARS_DATA_DIR:-$(cd .. && pwd)/shared/datasets}"
ruff check coars_env coars_agents examples tests benchmarks
python -m pytest -q tests "$@"
