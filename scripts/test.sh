#!/usr/bin/env bash
# The test command README.md gives: set up a bare machine, then lint, type-check and run the whole suite
# against the real engine. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ruff check orchestrator tests bench
mypy orchestrator
python3 -m pytest "$@"
