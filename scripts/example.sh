#!/usr/bin/env bash
# README's first command: set up a bare machine, run the example pipeline end to end, show its metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
pipe run pipeline.yaml "$@"
pipe metrics pipeline.yaml
