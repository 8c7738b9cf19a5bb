#!/usr/bin/env bash
# Start a private, throwaway PostgreSQL server for the store's tests (never the system one) and print its URL.
# Installs Debian's postgresql when it is missing. Idempotent: an already running private server is reused.
set -euo pipefail
PORT=${PIPE_PG_PORT:-55432}
DATA=${PIPE_PG_DATA:-/tmp/pipe-pg/data}
URL="postgresql+psycopg://postgres@127.0.0.1:$PORT/postgres"
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$bin" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
fi
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if ! as_pg "$bin/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
  mkdir -p "$(dirname "$DATA")"
  [ "$(id -u)" = 0 ] && chown postgres "$(dirname "$DATA")"
  [ -f "$DATA/PG_VERSION" ] || as_pg "$bin/initdb" -A trust -U postgres -D "$DATA" >/dev/null
  as_pg "$bin/pg_ctl" -D "$DATA" -l "$DATA/../server.log" -w -o "-p $PORT -k /tmp -c listen_addresses=127.0.0.1" start >/dev/null
fi
echo "$URL"
