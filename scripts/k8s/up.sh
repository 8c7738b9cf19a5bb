#!/bin/bash
# scripts/k8s/up.sh STATE_DIR: the kubernetes executor's test cluster (adapted from the team's measured recipe): a single-node Kubernetes 1.20 (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# kubelet + dockershim on a PRIVATE dockerd) inside a network namespace that has only a loopback interface and no
# route out. Writes STATE_DIR/admin.kubeconfig (https://127.0.0.1:6443, reachable only inside the namespace) and
# STATE_DIR/env. Stop with scripts/k8s/down.sh STATE_DIR.
# It also runs the object store the pods hand files through: moto's S3 server on docker0 (http://10.244.0.1:9000),
# reachable from pods and from clients inside the namespace only; its bucket is `pipe-handoff`.
#   BIN_DIR      binaries from build.sh (default /var/cache/pipe-k8s/bin)
#   K8S_NS       network namespace name (default pipe-k8s)
#   SEED_IMAGES  images copied from the machine's shared engine into the private dockerd, read-only use of the
#                shared engine (docker save | load); default "pipe-busybox:latest"
#   SEED_DOCKER  the shared engine's socket (default unix:///var/run/docker.sock; only `docker save` is run on it)
#   STOP_AFTER   debug: stop after the named step (netns, dockerd, images, etcd, pki, apiserver, controllers)
# Host safety: nothing writes host sysctls (patched kubelet, K8S_LAB_NO_HOST_WRITES=1), no negative oom_score_adj,
# no iptables rules, no kernel modules, AWS_EC2_METADATA_DISABLED=true in every process, all state in STATE_DIR.
set -euo pipefail
STATE=${1:?usage: up.sh STATE_DIR}
BIN=${BIN_DIR:-/var/cache/pipe-k8s/bin}
NS=${K8S_NS:-pipe-k8s}
SEED_IMAGES=${SEED_IMAGES-pipe-busybox:latest}
SEED_DOCKER=${SEED_DOCKER:-unix:///var/run/docker.sock}
# the python that has moto (the test dependencies), resolved before PATH is narrowed
PY=${PIPE_K8S_PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}
"$PY" -c 'import moto.server, boto3' || { echo "$PY lacks moto[server] (a test dependency)" >&2; exit 1; }
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export AWS_EC2_METADATA_DISABLED=true K8S_LAB_NO_HOST_WRITES=1
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet pause; do
  [ -x "$BIN/$b" ] || [ -n "${STOP_AFTER:-}" ] || { echo "missing $BIN/$b: run build.sh" >&2; exit 1; }; done
for c in etcd dockerd docker nsenter unshare openssl curl python3 ip tar awk; do
  command -v $c >/dev/null || { echo "missing $c" >&2; exit 1; }; done
[ -e "/run/netns/$NS" ] && { echo "netns $NS exists: run scripts/k8s/down.sh first" >&2; exit 1; }
mkdir -p "$STATE"; STATE=$(cd "$STATE" && pwd)
[ -z "$(ls -A "$STATE")" ] || { echo "$STATE is not empty" >&2; exit 1; }
mkdir -p "$STATE"/{pids,log,pki,etcd,docker,run,varlog,varlib,run-containerd,cm-flexvolume,dockershim,kubelet/pki,kubelet/volume-plugins,kubelet/seccomp,cni/bin,cni/net.d}
chmod 700 "$STATE"
echo "$NS" > "$STATE/netns"
ts() { date +%s.%N; }
T0=$(ts)
step() { local n=$1 t; shift; t=$(ts); "$@"; printf '%-20s %6.2f s\n' "$n" "$(awk -v a="$(ts)" -v b="$t" 'BEGIN{print a-b}')" | tee -a "$STATE/times.txt" >&2
  if [ "${STOP_AFTER:-}" = "$n" ]; then echo "stopped after $n (STOP_AFTER)" >&2; exit 0; fi; }
X() { ip netns exec "$NS" "$@"; }                        # run a client command inside the namespace
start() {   # start NAME CMD...: own session, env with the safety switches, pid in pids/NAME.pid
  local n=$1; shift
  setsid env -i PATH="$PATH" HOME="$STATE" AWS_EC2_METADATA_DISABLED=true K8S_LAB_NO_HOST_WRITES=1 \
    NO_PROXY='*' no_proxy='*' "$@" > "$STATE/log/$n.log" 2>&1 < /dev/null &
  echo $! > "$STATE/pids/$n.pid"
}
waitfor() { local what=$1 n=$2; shift 2; for k in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "timeout waiting for $what" >&2; return 1; }

gate() {   # gate ALLOWED_LINKS: the safety check, run before any Kubernetes binary starts and again after dockerd
  local links; links=$(ip -n "$NS" -o link show | awk -F': ' '{sub(/@.*/,"",$2); print $2}' | sort | tr '\n' ' ')
  [ "$links" = "$1" ] || { echo "unexpected links in $NS: '$links' (want '$1')" >&2; return 1; }
  if ip -n "$NS" route show default | grep -q . || ip -n "$NS" -6 route show default | grep -q .; then
    echo "default route in $NS" >&2; return 1; fi
  for a in 169.254.169.254 1.1.1.1 10.0.0.1 192.168.0.1; do
    if ip -n "$NS" route get "$a" >/dev/null 2>&1; then echo "$a routable in $NS" >&2; return 1; fi; done
  { echo "## gate: links '$links'"; ip -n "$NS" -br addr; echo "# ip route show table all"; ip -n "$NS" route show table all
    echo "# ip -6 route show table all"; ip -n "$NS" -6 route show table all
    echo "# ip route get 169.254.169.254"; ip -n "$NS" route get 169.254.169.254 2>&1 || true
    echo "# net.ipv4.ip_forward in $NS: $(ip netns exec "$NS" cat /proc/sys/net/ipv4/ip_forward)"; } >> "$STATE/netns-check.txt"
}
netns() {
  ip netns add "$NS"
  ip -n "$NS" link set lo up
  # a new netns may start with ip_forward=1 on this kernel: switch forwarding off in OUR namespace only
  # (a per-netns value; the host's is not touched, k8s-down.sh's caller can compare)
  ip netns exec "$NS" sh -c 'echo 0 > /proc/sys/net/ipv4/ip_forward'
  gate "lo "
}

private_dockerd() {
  cat > "$STATE/docker/daemon.json" <<J
{ "bip": "10.244.0.1/24", "iptables": false, "ip6tables": false, "ip-forward": false, "ip-masq": false,
  "userland-proxy": false, "cgroup-parent": "/$NS", "exec-opts": ["native.cgroupdriver=cgroupfs"],
  "log-driver": "json-file", "storage-driver": "overlay2", "live-restore": false }
J
  # nsrun approach: the netns, a private mount ns (slave: nothing mounted here reaches the host), its own hostname,
  # a sysfs of that netns, the host's cgroup v1 tree re-bound (ip netns exec alone drops it: "Devices cgroup isn't
  # mounted"), /var/log, /var/lib and /run/containerd replaced by folders in STATE (the kubelet writes /var/log/pods,
  # /var/log/containers and /var/lib/kubelet/device-plugins whatever its flags say; containerd puts shim sockets in
  # /run/containerd/s; dockerd and containerd keep everything else under --data-root/--exec-root). The kubelet joins this
  # same mount ns later (nsenter -t dockerd), so the volumes it mounts are the ones dockerd sees.
  start dockerd nsenter --net="/run/netns/$NS" unshare --mount --uts --propagation slave bash -c '
    set -e; S=$0; hostname pipe-k8s; cg=$S/.cg; mkdir -p $cg
    mount --rbind /sys/fs/cgroup $cg; mount -t sysfs sysfs /sys; mount --rbind $cg /sys/fs/cgroup; umount -l $cg; rmdir $cg
    mount --bind $S/varlog /var/log; mount --bind $S/varlib /var/lib
    [ -d /run/containerd ] && mount --bind $S/run-containerd /run/containerd
    exec "$@"' "$STATE" dockerd --config-file "$STATE/docker/daemon.json" --data-root "$STATE/docker/root" \
      --exec-root "$STATE/docker/exec" --pidfile "$STATE/docker/docker.pid" -H "unix://$STATE/docker/docker.sock"
  waitfor dockerd 300 docker -H "unix://$STATE/docker/docker.sock" version
  waitfor docker.pid 50 test -s "$STATE/docker/docker.pid"
  # pods need an IP (the kubelet kills a sandbox without one and, for restartPolicy Never, never makes a new
  # one): docker0 lives inside the namespace; pods reach only it; the namespace still has no route out
  gate "docker0 lo "
}

images() {
  local D="docker -H unix://$STATE/docker/docker.sock"
  # pause from the source tree's pause.c, imported as a one-file image (no registry, no build)
  tar -C "$BIN" -cf - pause | $D import -c 'ENTRYPOINT ["/pause"]' -c 'USER 65535:65535' - pipe-k8s/pause:3.2 >/dev/null
  for i in $SEED_IMAGES; do docker -H "$SEED_DOCKER" save "$i" | $D load -q >/dev/null; done
  $D images --format '{{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}' > "$STATE/images.txt"
}

s3_up() {   # moto's S3 server, bound to docker0 inside the namespace: the pods' hand-off store
  start s3 ip netns exec "$NS" "$PY" -m moto.server -H 10.244.0.1 -p 9000
  waitfor s3 300 X curl -s -o /dev/null http://10.244.0.1:9000/
  X env AWS_ACCESS_KEY_ID=pipe AWS_SECRET_ACCESS_KEY=pipe-secret AWS_EC2_METADATA_DISABLED=true "$PY" -c '
import boto3; boto3.client("s3", endpoint_url="http://10.244.0.1:9000", region_name="us-east-1").create_bucket(Bucket="pipe-handoff")'
}

etcd_up() {
  start etcd ip netns exec "$NS" etcd --name pipe-k8s --data-dir "$STATE/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster pipe-k8s=http://127.0.0.1:2380 --initial-cluster-state new
  waitfor etcd 300 X curl -sf http://127.0.0.1:2379/health
}

pki() {
  openssl genrsa -out "$STATE/pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$STATE/pki/sa.key" -pubout -out "$STATE/pki/sa.pub" 2>/dev/null
  ADMIN_TOKEN=$(openssl rand -hex 24); NODE_TOKEN=$(openssl rand -hex 24)
  printf '%s,admin,admin,system:masters\n%s,system:node:127.0.0.1,node-127.0.0.1,system:nodes\n' \
    "$ADMIN_TOKEN" "$NODE_TOKEN" > "$STATE/pki/tokens.csv"
  chmod 600 "$STATE/pki/"*
}

apiserver() {
  start kube-apiserver ip netns exec "$NS" "$BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port=6443 --insecure-port=0 \
    --cert-dir="$STATE/pki" --token-auth-file="$STATE/pki/tokens.csv" --authorization-mode=Node,RBAC \
    --service-account-key-file="$STATE/pki/sa.pub" --service-account-signing-key-file="$STATE/pki/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local --service-cluster-ip-range=10.96.0.0/24 \
    --kubelet-preferred-address-types=Hostname --allow-privileged=false --profiling=false \
    --enable-admission-plugins=NamespaceLifecycle,ServiceAccount,DefaultStorageClass,ResourceQuota,LimitRanger,NodeRestriction
  waitfor kube-apiserver 600 X curl -A pipe-k8s-up -sf --cacert "$STATE/pki/apiserver.crt" https://127.0.0.1:6443/readyz
  kubeconfig admin "$ADMIN_TOKEN" > "$STATE/admin.kubeconfig"
  kubeconfig node "$NODE_TOKEN" > "$STATE/kubelet.kubeconfig"
  chmod 600 "$STATE"/*.kubeconfig
  cat > "$STATE/env" <<E
K8S_NS=$NS
KUBECONFIG=$STATE/admin.kubeconfig
K8S_SERVER=https://127.0.0.1:6443
K8S_CA=$STATE/pki/apiserver.crt
PRIVATE_DOCKER_HOST=unix://$STATE/docker/docker.sock
PIPE_K8S_S3_ENDPOINT=http://10.244.0.1:9000
PIPE_K8S_S3_URL=s3://pipe-handoff/
E
}
kubeconfig() {   # kubeconfig USER TOKEN: the apiserver's self-signed bundle as CA, bearer token
  cat <<K
apiVersion: v1
kind: Config
clusters:
- name: pipe-k8s
  cluster: {server: "https://127.0.0.1:6443", certificate-authority: "$STATE/pki/apiserver.crt"}
users:
- name: $1
  user: {token: "$2"}
contexts:
- name: pipe-k8s
  context: {cluster: pipe-k8s, user: $1}
current-context: pipe-k8s
K
}

controllers() {
  local K="$STATE/admin.kubeconfig"
  start kube-controller-manager ip netns exec "$NS" "$BIN/kube-controller-manager" --kubeconfig="$K" \
    --authentication-kubeconfig="$K" --authorization-kubeconfig="$K" --leader-elect=false \
    --bind-address=127.0.0.1 --port=0 --secure-port=10257 --profiling=false \
    --service-account-private-key-file="$STATE/pki/sa.key" --root-ca-file="$STATE/pki/apiserver.crt" \
    --use-service-account-credentials=false --cluster-name=pipe-k8s \
    --flex-volume-plugin-dir="$STATE/cm-flexvolume"   # its default /usr/libexec/kubernetes/... is created otherwise
  start kube-scheduler ip netns exec "$NS" "$BIN/kube-scheduler" --kubeconfig="$K" \
    --authentication-kubeconfig="$K" --authorization-kubeconfig="$K" --leader-elect=false \
    --bind-address=127.0.0.1 --port=0 --secure-port=10259 --profiling=false
  waitfor kube-controller-manager 300 X curl -skf https://127.0.0.1:10257/healthz
  waitfor kube-scheduler 300 X curl -skf https://127.0.0.1:10259/healthz
}

kubelet() {
  # joins the private dockerd's net, mount and uts namespaces (same view of cgroups, /sys, /var/log, volumes).
  # Node name = 127.0.0.1: with no default route the kubelet finds no node IP (node has no addresses, so
  # `logs` fails: "no preferred addresses found"); --node-ip refuses loopback, but an IP given as hostname-override
  # is taken as the InternalIP unchecked, and the apiserver then reaches the kubelet on 127.0.0.1:10250.
  local dpid; dpid=$(cat "$STATE/docker/docker.pid")
  start kubelet nsenter --target "$dpid" --net --mount --uts "$BIN/kubelet" \
    --kubeconfig="$STATE/kubelet.kubeconfig" --root-dir="$STATE/kubelet" --cert-dir="$STATE/kubelet/pki" \
    --container-runtime=docker --docker-endpoint="unix://$STATE/docker/docker.sock" \
    --container-runtime-endpoint="unix://$STATE/run/dockershim.sock" \
    --image-service-endpoint="unix://$STATE/run/dockershim.sock" \
    --experimental-dockershim-root-directory="$STATE/dockershim" \
    --pod-infra-container-image=pipe-k8s/pause:3.2 --hostname-override=127.0.0.1 \
    --address=127.0.0.1 --port=10250 --read-only-port=0 --healthz-bind-address=127.0.0.1 --healthz-port=10248 \
    --fail-swap-on=false --cgroup-driver=cgroupfs --cgroups-per-qos=false --enforce-node-allocatable= \
    --make-iptables-util-chains=false --hairpin-mode=none \
    --image-gc-high-threshold=100 --image-gc-low-threshold=99 \
    '--eviction-hard=memory.available<1Mi,nodefs.available<1%,imagefs.available<1%' \
    --protect-kernel-defaults=false --oom-score-adj=0 --register-node=true --max-pods=20 \
    --volume-plugin-dir="$STATE/kubelet/volume-plugins" --seccomp-profile-root="$STATE/kubelet/seccomp" \
    --cni-bin-dir="$STATE/cni/bin" --cni-conf-dir="$STATE/cni/net.d" --cni-cache-dir="$STATE/cni/cache" \
    --node-status-update-frequency=2s --v=1
  local tk; tk=$(awk -F, 'NR==1{print $1}' "$STATE/pki/tokens.csv")
  ready() { X curl -A pipe-k8s-up -sf --cacert "$STATE/pki/apiserver.crt" -H "Authorization: Bearer $tk" \
      https://127.0.0.1:6443/api/v1/nodes/127.0.0.1 | python3 -c 'import json,sys
c={x["type"]:x["status"] for x in json.load(sys.stdin)["status"]["conditions"]}; sys.exit(c.get("Ready")!="True")'; }
  waitfor "node Ready" 1200 ready
}

step netns       netns
step dockerd     private_dockerd
step images      images
step s3          s3_up
step etcd        etcd_up
step pki         pki
step apiserver   apiserver
step controllers controllers
step kubelet-Ready kubelet
printf '%-20s %6.2f s\n' TOTAL "$(awk -v a="$(ts)" -v b="$T0" 'BEGIN{print a-b}')" | tee -a "$STATE/times.txt" >&2
echo "up: ip netns exec $NS <client> with KUBECONFIG=$STATE/admin.kubeconfig"
