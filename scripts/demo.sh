#!/usr/bin/env bash
# The README's main job: install if needed, then train CoARS end to end on the embedded
# default (synthetic data built in code + the offline SmolLM2-135M-Instruct) and print a
# before/after evaluation table. Extra arguments go to examples/train_coevolve.py.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install.sh
python examples/train_coevolve.py "$@"
