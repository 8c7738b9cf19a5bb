#!/usr/bin/env bash
# A private, throwaway S3 server for the remote store's tests: Ceph's radosgw from Debian's packages (one mon, one
# memstore OSD, no cephx, radosgw on loopback, plain http), with a test user of known keys. Never a system Ceph.
#
#   bash scripts/s3.sh          start it (or find it running) and print KEY=VALUE lines for the tests:
#                               PIPE_TEST_S3_ENDPOINT, PIPE_TEST_S3_ACCESS_KEY, PIPE_TEST_S3_SECRET_KEY
#   bash scripts/s3.sh stop     stop the daemons (by their pid files) and remove the data
#
# Installs Debian's ceph-mon, ceph-osd, radosgw and ceph-common when they are missing. Idempotent: a server that
# answers and knows the test user is reused. The OSD keeps objects in memory (memstore), so a stopped server
# loses everything and the next start makes a new cluster. Progress goes to stderr, only KEY=VALUE to stdout.
# Traps met on the way (each handled below): the first OSD start may exit with "wrong fsid" and must be retried;
# radosgw answers HTTP some seconds after it starts; deleted objects keep their memory for 2 hours unless rgw's
# garbage collector is told otherwise (the OSD then reports full and writes hang); the host may set AWS_CA_BUNDLE, which plain http ignores only
# in clients that are told so (the tests' clients unset it for http endpoints).
set -euo pipefail
DIR=${PIPE_S3_DIR:-/tmp/pipe-s3}
PORT=${PIPE_S3_PORT:-7480}
MON_PORT=${PIPE_S3_MON_PORT:-16789}
ENDPOINT="http://127.0.0.1:$PORT"
ACCESS=pipe-test
SECRET=pipe-test-secret-0123456789
log() { echo "s3.sh: $*" >&2; }

stop() {
  for n in client.rgw.pipe osd.0 mon.a; do
    f=$DIR/run/$n.pid
    [ -f "$f" ] || continue
    p=$(cat "$f")
    kill "$p" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    log "$n ($p) stopped"
  done
  rm -rf "$DIR"
}

print_env() {
  printf 'PIPE_TEST_S3_ENDPOINT=%s\nPIPE_TEST_S3_ACCESS_KEY=%s\nPIPE_TEST_S3_SECRET_KEY=%s\n' \
    "$ENDPOINT" "$ACCESS" "$SECRET" | tee "$DIR/env"
}

answers() { curl -s -o /dev/null --max-time 2 "$ENDPOINT/"; }

if [ "${1:-start}" = stop ]; then stop; exit 0; fi

if [ -f "$DIR/env" ] && answers; then
  print_env
  exit 0
fi

if ! command -v radosgw >/dev/null || ! command -v ceph-osd >/dev/null || ! command -v ceph-mon >/dev/null \
   || ! command -v curl >/dev/null; then
  log "installing Debian's Ceph packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends ceph-mon ceph-osd radosgw ceph-common curl \
    >/dev/null
fi

stop 2>/dev/null  # a half-started or dead cluster: memstore lost its objects anyway, so start anew
mkdir -p "$DIR"/{mon,osd0,rgw,run,log}
C=$DIR/ceph.conf
FSID=$(python3 -c 'import uuid; print(uuid.uuid4())')
cat > "$C" <<EOC
[global]
fsid = $FSID
mon host = v1:127.0.0.1:$MON_PORT
mon initial members = a
public network = 127.0.0.0/8
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd pool default pg num = 8
osd pool default pgp num = 8
mon max pg per osd = 1000
osd objectstore = memstore
memstore device bytes = 8589934592
# radosgw frees a deleted object's data only through its garbage collector, by default after 2 hours: memstore
# then fills up and every write hangs ("1 full osd"). Collect at once, every 10 s.
rgw gc obj min wait = 0
rgw gc processor period = 10
osd crush chooseleaf type = 0
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log
pid file = $DIR/run/\$name.pid
keyring = $DIR/keyring
[mon]
mon data = $DIR/mon
[osd]
osd data = $DIR/osd\$id
[client.rgw.pipe]
rgw frontends = beast endpoint=127.0.0.1:$PORT
rgw data = $DIR/rgw
EOC
ceph_() { timeout 30 ceph -c "$C" "$@"; }
monmaptool --create --clobber --addv a "[v1:127.0.0.1:$MON_PORT]" --fsid "$FSID" "$DIR/monmap" >/dev/null
ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-mon -c "$C" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/keyring"
ceph-mon -c "$C" -i a  # daemonizes; pid in run/mon.a.pid
ceph_ mon stat >/dev/null
OSD_UUID=$(python3 -c 'import uuid; print(uuid.uuid4())')
ceph_ osd new "$OSD_UUID" >/dev/null
ceph-osd -c "$C" -i 0 --mkfs --osd-uuid "$OSD_UUID" >"$DIR/log/osd-mkfs.out" 2>&1
up=""
for _ in 1 2 3 4 5; do  # the first start sometimes exits with "mon_cmd_maybe_osd_create fail: 'wrong fsid'"
  ceph-osd -c "$C" -i 0 2>>"$DIR/log/osd-start.out" || true
  for _ in $(seq 1 20); do
    if ceph_ osd stat 2>/dev/null | grep -q '1 up'; then up=1; break 2; fi
    sleep 0.5
  done
done
[ -n "$up" ] || { log "the OSD did not come up; see $DIR/log"; exit 1; }
radosgw -c "$C" -n client.rgw.pipe
for _ in $(seq 1 240); do answers && break; sleep 0.25; done
answers || { log "radosgw does not answer on $ENDPOINT; see $DIR/log"; exit 1; }
radosgw-admin -c "$C" user create --uid=pipe-test --display-name=pipe-test \
  --access-key="$ACCESS" --secret="$SECRET" >/dev/null
log "radosgw answering on $ENDPOINT"
print_env
