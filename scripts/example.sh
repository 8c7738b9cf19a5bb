#!/usr/bin/env bash
# README's first command: set up a bare machine, run the example pipeline end to end, show its metrics, then serve
# the model that passed the gate and answer one request with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
pipe run pipeline.yaml "$@"
pipe metrics pipeline.yaml
pipe serve up pipeline.yaml          # the run's model passed its gate: serve it behind pipe's proxy on 127.0.0.1:8080
trap 'pipe serve down pipeline.yaml >/dev/null' EXIT   # nothing keeps running once the example is done
pipe serve status pipeline.yaml
echo "POST /predict with the first row of data/new/rows.csv:"
curl -sS --fail -X POST http://127.0.0.1:8080/predict -H 'Content-Type: application/json' \
     -d '[{"age": 79, "sex": 2, "bmi": 23.3, "bp": 88, "s1": 186, "s2": 128.4, "s3": 33, "s4": 6, "s5": 4.81, "s6": 102}]'
echo
