#!/usr/bin/env bash
# The test command of README.md: install if needed, lint, then the whole suite
# (slow integration tests included). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install.sh
export COARS_DATA_DIR="${COARS_DATA_DIR:-$(cd .. && pwd)/shared/datasets}"
ruff check coars_env coars_agents examples tests benchmarks scripts
python -m pytest -q tests "$@"
