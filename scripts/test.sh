#!/usr/bin/env bash
# The test command README.md gives: set up a bare machine, then lint, type-check and run the whole suite
# against the real engine. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ruff check orchestrator tests bench
mypy orchestrator
# the store's tests also run against a real PostgreSQL: a private server started here
PIPE_TEST_POSTGRES_URL=${PIPE_TEST_POSTGRES_URL:-$(bash scripts/postgres.sh)}
export PIPE_TEST_POSTGRES_URL
python3 -m pytest "$@"
