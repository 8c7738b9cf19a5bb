#!/usr/bin/env bash
# Make sure a Docker engine answers on /var/run/docker.sock: install Debian's docker.io
# if there is no dockerd, start it in the background, and wait for the socket.
set -euo pipefail
SOCK=${PIPE_DOCKER_SOCK:-/var/run/docker.sock}
if docker info >/dev/null 2>&1; then exit 0; fi
if ! command -v dockerd >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq docker.io >/dev/null
fi
if ! pgrep -x dockerd >/dev/null; then
  mkdir -p /var/log
  nohup dockerd --host "unix://$SOCK" >/var/log/pipe-dockerd.log 2>&1 &
fi
for _ in $(seq 1 120); do
  if docker -H "unix://$SOCK" info >/dev/null 2>&1; then exit 0; fi
  sleep 0.5
done
echo "engine.sh: dockerd did not answer on $SOCK within 60 s; see /var/log/pipe-dockerd.log" >&2
tail -20 /var/log/pipe-dockerd.log >&2 || true
exit 1
