#!/usr/bin/env bash
# Everything a fresh machine needs before `pipe` can run: a Docker engine, the local base images, the package.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/engine.sh
bash scripts/base-images.sh >/dev/null
if ! command -v cron >/dev/null; then  # `pipe schedule install` writes crontab lines; the tests use real cron
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cron >/dev/null
fi
if [ "$(id -u)" = 0 ] && ! command -v mkfs.xfs >/dev/null; then  # the reflink test mounts a small XFS loop file
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xfsprogs >/dev/null
fi
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then  # the web UI's browser tests
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
if ! command -v curl >/dev/null; then  # scripts/example.sh asks the served model for one prediction
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null
fi
if ! command -v wrk >/dev/null; then  # bench/serve_bench.py's load generator (and its smoke test)
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
if [ ! -x /usr/bin/rclone ] || [ ! -x /bin/busybox ] || [ ! -x /usr/bin/b3sum ]; then  # the swarm hand-off agent image is made of these
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rclone \
    busybox-static b3sum >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
# an editable install compiles nothing (pip compiles a regular install's modules when it installs them), and with
# PYTHONDONTWRITEBYTECODE set, as on CI machines, every `pipe` command would compile pipe's modules anew (about
# 0.04-0.1 s of a 0.5 s no-op run, bench/PERF_RESULTS.md): compile them once here, as pip would
python3 -m compileall -q orchestrator
