#!/usr/bin/env bash
# A private, throwaway 3-node Docker Swarm for the swarm executor's tests, all on this machine and all inside
# network namespaces this script creates (the host namespace gets no address and no route):
#   pipe-hub      a bridge at 10.250.0.1/24; Debian's docker-registry at 10.250.0.1:5000; at 10.250.0.1:9000 a
#                 relay to the S3 server of scripts/s3.sh (radosgw on the host's 127.0.0.1:7480)
#   pipe-n1..n3   one private dockerd each (own data-root, exec-root, pidfile, socket, cgroup parent, bip, address
#                 pools, the registry as insecure), n1 the manager, n2 and n3 workers; each node has its own
#                 hand-off folder at $DIR/handoff (a different folder on every node, like a real host's disk)
#
#   bash scripts/cluster.sh [up]   bring it up (or find it up) and print KEY=VALUE lines for the tests
#   bash scripts/cluster.sh down   stop every daemon by its pid, remove namespaces, cgroups and data
#   bash scripts/cluster.sh kill-node n3    the machine is lost: SIGKILL to its dockerd, containerd, shims and
#                                           containers at once (the manager sees it `down` ~15 s later)
#   bash scripts/cluster.sh start-node n3   bring it back on its data-root; returns once all 3 nodes are Ready
#
# Never runs `docker swarm init` on the main engine. Traps met on the way (each handled below): a plain
# `ip netns exec dockerd` loses the cgroup mount ("Devices cgroup isn't mounted"), so each daemon runs in its own
# mount namespace with /sys and the cgroup tree re-bound; two daemons with one cgroup parent, bridge address or
# address pool break each other; a plain-http registry must be insecure-registries on every node. Progress goes
# to stderr, only KEY=VALUE to stdout. Needs root, iproute2, util-linux (nsenter, unshare), docker.io.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin
HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${PIPE_CLUSTER_DIR:-/tmp/pipe-cluster}
N=3
HUB=pipe-hub
REG=10.250.0.1:5000
S3_NODE=http://10.250.0.1:9000
log() { echo "cluster.sh: $*" >&2; }
d() { docker -H "unix://$DIR/n$1/docker.sock" "${@:2}"; }

print_env() {
  {
    echo "PIPE_TEST_SWARM_HOST=unix://$DIR/n1/docker.sock"
    echo "PIPE_TEST_SWARM_NODES=$(for i in $(seq 1 $N); do printf 'unix://%s/n%s/docker.sock,' "$DIR" "$i"; done | sed 's/,$//')"
    echo "PIPE_TEST_SWARM_REGISTRY=$REG"
    echo "PIPE_TEST_SWARM_S3_NODE_ENDPOINT=$S3_NODE"
    echo "PIPE_TEST_SWARM_HANDOFF_DIR=$DIR/handoff"
  } | tee "$DIR/env"
}

ready() { [ "$(d 1 node ls --format '{{.Status}}' 2>/dev/null | grep -c Ready)" = "$N" ]; }

stop_pid() {  # stop_pid FILE: SIGTERM the process whose pid FILE holds, wait up to 20 s, then SIGKILL
  [ -f "$1" ] || return 0
  local p; p=$(cat "$1")
  kill "$p" 2>/dev/null || return 0
  for _ in $(seq 1 200); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$p" 2>/dev/null || true
}

down() {
  for i in $(seq 1 $N); do stop_pid "$DIR/n$i/docker.pid" & done
  stop_pid "$DIR/registry.pid" & stop_pid "$DIR/relay.pid" &
  wait
  # shims of a node daemon that was SIGKILLed (only ours: their -address is under $DIR)
  for p in $(pgrep -f "containerd-shim-runc-v2 .*-address $DIR/" || true); do kill -9 "$p" 2>/dev/null || true; done
  for ns in pipe-n1 pipe-n2 pipe-n3 $HUB; do ip netns del $ns 2>/dev/null || true; done
  for c in /sys/fs/cgroup/*/pipe-n[0-9]*; do
    [ -d "$c" ] && { find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null || log "cgroup busy: $c"; }
  done
  rm -rf "$DIR"
  log "down"
}

# a node daemon in its netns and its own mount namespace (the cgroup tree and a sysfs of its netns re-bound, a
# node-local hand-off folder)
start_daemon() {
  local i=$1 n=$DIR/n$1; mkdir -p "$n" "$DIR/local-n$i"
  cat > "$n/daemon.json" <<J
{ "insecure-registries": ["$REG"], "bip": "10.251.$i.1/24",
  "default-address-pools": [{"base": "10.252.$i.0/24", "size": 28}],
  "cgroup-parent": "/pipe-n$i", "userland-proxy": false, "log-driver": "json-file",
  "labels": ["dev.pipe.test-node=n$i"] }
J
  setsid nsenter --net=/run/netns/pipe-n$i unshare --mount --uts --propagation slave bash -c '
    set -e; hostname "$0"; cg=$1/.cg-$$; mkdir -p $cg
    mount --rbind /sys/fs/cgroup $cg; mount -t sysfs sysfs /sys; mount --rbind $cg /sys/fs/cgroup
    umount -l $cg; rmdir $cg
    mkdir -p $1/handoff; mount --bind $1/local-${0#pipe-} $1/handoff
    exec dockerd --config-file $2/daemon.json --data-root $2/root --exec-root $2/exec \
      --pidfile $2/docker.pid -H unix://$2/docker.sock' "pipe-n$i" "$DIR" "$n" \
    >>"$n/dockerd.log" 2>&1 </dev/null &
}

wait_daemon() {
  for _ in $(seq 1 300); do d "$1" version >/dev/null 2>&1 && return 0; sleep 0.1; done
  d "$1" version >/dev/null || { log "dockerd n$1 did not start; see $DIR/n$1/dockerd.log"; return 1; }
}

alive() {  # the pids on stdin that still exist
  local p; while read -r p; do kill -0 "$p" 2>/dev/null && echo "$p"; done; true
}

node_pids() {  # every process of node $1: its dockerd, containerd, shims and the containers in its cgroups
  local n=$DIR/n$1
  [ -f "$n/docker.pid" ] && echo "$(cat "$n/docker.pid")"  # dockerd writes it without a newline
  pgrep -f "containerd .*$n/exec/" || true
  pgrep -f "containerd-shim-runc-v2 .*-address $n/exec/" || true
  cat /sys/fs/cgroup/pids/pipe-n$1/*/cgroup.procs /sys/fs/cgroup/pids/pipe-n$1/cgroup.procs 2>/dev/null || true
}

kill_node() {  # the machine n$1 is lost: SIGKILL to all its processes at once, nothing shut down cleanly
  local p
  for p in $(node_pids "$1" | sort -u); do kill -9 "$p" 2>/dev/null || true; done
  for _ in $(seq 1 100); do [ -z "$(node_pids "$1" | sort -u | alive)" ] && break; sleep 0.1; done
  rm -f "$DIR/n$1/docker.pid"
  log "n$1 killed"
}

start_node() {  # bring n$1 back on its old data-root (it rejoins the swarm by itself); wait until all are Ready
  d "$1" version >/dev/null 2>&1 && { log "n$1 is running"; return 0; }
  [ -z "$(node_pids "$1" | sort -u | alive)" ] || { log "n$1 is half alive"; exit 1; }
  start_daemon "$1"
  wait_daemon "$1" || exit 1
  for _ in $(seq 1 600); do ready && break; sleep 0.1; done
  ready || { log "n$1 is not Ready again"; exit 1; }
  log "n$1 back, $N nodes Ready"
}

case "${1:-up}" in
  down) down; exit 0 ;;
  kill-node) kill_node "${2#n}"; exit 0 ;;
  start-node) start_node "${2#n}"; exit 0 ;;
  up) ;;
  *) log "usage: cluster.sh [up|down|kill-node nX|start-node nX]"; exit 2 ;;
esac
if [ -f "$DIR/env" ] && ready; then cat "$DIR/env"; exit 0; fi

command -v docker-registry >/dev/null || {
  log "installing Debian's docker-registry"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-registry >/dev/null
}
[ -n "${PIPE_TEST_S3_ENDPOINT:-}" ] || { set -a; eval "$(bash "$HERE/s3.sh")"; set +a; }
down 2>/dev/null  # a half-started or stale cluster: start anew
mkdir -p "$DIR"/registry

# the network: a hub bridge and three nodes, veth pairs made directly inside the namespaces
ip netns add $HUB
ip -n $HUB link add br0 type bridge
ip -n $HUB addr add 10.250.0.1/24 dev br0
ip -n $HUB link set br0 up
ip -n $HUB link set lo up
for i in $(seq 1 $N); do
  ns=pipe-n$i
  ip netns add $ns
  ip -n $ns link add eth0 type veth peer name v-n$i netns $HUB
  ip -n $HUB link set v-n$i master br0 up
  ip -n $ns addr add 10.250.0.1$i/24 dev eth0
  ip -n $ns link set eth0 up
  ip -n $ns link set lo up
  ip -n $ns route add default via 10.250.0.1
done

# the registry and the S3 relay in the hub
cat > "$DIR/registry/config.yml" <<Y
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $DIR/registry/data}, delete: {enabled: true}}
http: {addr: $REG}
Y
setsid ip netns exec $HUB /usr/bin/docker-registry serve "$DIR/registry/config.yml" \
  >"$DIR/registry/log" 2>&1 </dev/null & echo $! >"$DIR/registry.pid"
s3_port=${PIPE_TEST_S3_ENDPOINT##*:}
setsid python3 "$HERE/netns-relay.py" $HUB 10.250.0.1 9000 127.0.0.1 "${s3_port%/}" \
  >"$DIR/relay.log" 2>&1 </dev/null & echo $! >"$DIR/relay.pid"

for i in $(seq 1 $N); do start_daemon "$i"; done
for i in $(seq 1 $N); do wait_daemon "$i" || exit 1; done

# the swarm: n1 manager, n2 and n3 workers, each labelled with its name
d 1 swarm init --advertise-addr 10.250.0.11 --listen-addr 10.250.0.11:2377 --data-path-addr 10.250.0.11 \
  --default-addr-pool 10.254.0.0/16 >/dev/null
token=$(d 1 swarm join-token -q worker); joins=()
for i in $(seq 2 $N); do
  d "$i" swarm join --token "$token" --advertise-addr "10.250.0.1$i" --listen-addr "10.250.0.1$i:2377" \
    10.250.0.11:2377 >/dev/null & joins+=($!)
done
for p in "${joins[@]}"; do wait "$p"; done  # not a bare wait: the daemons above are children too
for _ in $(seq 1 300); do ready && break; sleep 0.1; done
ready || { log "the nodes did not all become Ready"; exit 1; }
for i in $(seq 1 $N); do d 1 node update --label-add "pipe.node=n$i" "pipe-n$i" >/dev/null; done
for _ in $(seq 1 100); do ip netns exec $HUB bash -c "</dev/tcp/10.250.0.1/5000" 2>/dev/null && break; sleep 0.1; done

# the tests' small image on the manager, as if it had pulled it (nothing can be pulled here)
docker save pipe-busybox:latest | d 1 load -q >/dev/null
log "3 nodes Ready; registry $REG, S3 $S3_NODE (relay to $PIPE_TEST_S3_ENDPOINT)"
print_env
