#!/usr/bin/env bash
# Everything a fresh machine needs before `pipe` can run: a Docker engine, the local base images, the package.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/engine.sh
bash scripts/base-images.sh >/dev/null
python3 -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v -e '^WARNING: Running pip as' -e 'is ignored' || true
