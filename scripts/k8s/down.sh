#!/bin/bash
# scripts/k8s/down.sh STATE_DIR: stop everything scripts/k8s/up.sh STATE_DIR started (by pid, checked against its command line),
# remove the private dockerd's containers, the network namespace, the cgroups and STATE_DIR. Idempotent.
#   KEEP_STATE=1  keep STATE_DIR (logs) instead of deleting it
set -uo pipefail
STATE=${1:?usage: down.sh STATE_DIR}
[ -d "$STATE" ] || { echo "no $STATE"; exit 0; }
STATE=$(cd "$STATE" && pwd)
NS=$(cat "$STATE/netns" 2>/dev/null || echo "${K8S_NS:-pipe-k8s}")
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
ts() { date +%s.%N; }; T0=$(ts); TL=$T0
lap() { local t; t=$(ts); printf '  %-22s %5.2f s\n' "$1" "$(awk -v a="$t" -v b="$TL" 'BEGIN{print a-b}')"; TL=$t; }
ours() { { tr "\0" " " < "/proc/$1/cmdline"; } 2>/dev/null | grep -qF -- "$STATE"; }   # guards against pid reuse
stop() {   # stop NAME PID [SECONDS]: TERM, wait, then KILL; only if the pid is still one of ours
  local n=$1 p=$2 w=${3:-10} k
  [ -n "$p" ] && ours "$p" || return 0
  kill -TERM "$p" 2>/dev/null
  for k in $(seq 1 $((w * 20))); do kill -0 "$p" 2>/dev/null || { echo "stopped $n ($p) after $((k / 20)).$((k % 20 * 5)) s"; return 0; }; sleep 0.05; done
  kill -KILL "$p" 2>/dev/null; echo "KILLED $n ($p) after ${w} s"
}
pid() { cat "$STATE/pids/$1.pid" 2>/dev/null; }
stop kubelet "$(pid kubelet)"
for n in kube-scheduler kube-controller-manager kube-apiserver; do stop $n "$(pid $n)" & done; wait   # in parallel
stop etcd "$(pid etcd)"
stop s3 "$(pid s3)"
lap "kubernetes processes"
D="docker -H unix://$STATE/docker/docker.sock"
if $D version >/dev/null 2>&1; then
  ids=$($D ps -aq); [ -n "$ids" ] && $D rm -f $ids >/dev/null && echo "removed $(echo $ids | wc -w) containers"
fi
lap "containers removed"
stop dockerd "$(cat "$STATE/docker/docker.pid" 2>/dev/null || cat "$STATE/pids/dockerd.pid" 2>/dev/null)" 30
lap "dockerd stopped"
# shims left by a dockerd that had to be KILLed: only those whose -address is inside STATE
for p in $(pgrep -f "containerd-shim.* -address $STATE/" 2>/dev/null); do ours "$p" && kill -KILL "$p" && echo "KILLED shim $p"; done
sleep 0.2
# the private mount ns dies with its last process; unmount anything of ours still visible here
grep -F " $STATE/" /proc/self/mountinfo | awk '{print $5}' | sort -r | while read -r m; do umount -l "$m" && echo "umount $m"; done
ip netns del "$NS" 2>/dev/null && echo "netns $NS deleted"
for d in /sys/fs/cgroup/*/"$NS"; do [ -d "$d" ] || continue
  find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null; [ -d "$d" ] && echo "cgroup busy: $d"; done
lap "netns, mounts, cgroups"
if [ "${KEEP_STATE:-0}" = 1 ]; then echo "kept $STATE"; else rm -rf "$STATE" && echo "$STATE removed"; fi
lap "state removed"
printf 'teardown %.2f s\n' "$(awk -v a="$(ts)" -v b="$T0" 'BEGIN{print a-b}')"
