#!/bin/bash
# scripts/k8s/build.sh: the Kubernetes 1.20.2 control plane + kubelet (dockershim) the kubernetes executor's tests
# run against, built from Debian bookworm's source package offline (vendored Go; only Debian's apt archive is
# needed), with the patches in ./patches applied (each says why). Adapted from the team's measured cluster recipe.
#   BUILD_DIR  source tree + Go build cache (default /var/cache/pipe-k8s/build; cache it in CI to skip the build)
#   BIN_DIR    output binaries (default /var/cache/pipe-k8s/bin)
# Reuse: if BIN_DIR holds binaries built from these exact scripts and patches (BUILD_KEY), nothing is rebuilt.
# Idempotent otherwise: an existing tree is reused (make is incremental), patches already applied are skipped.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BUILD_DIR=${BUILD_DIR:-/var/cache/pipe-k8s/build}
BIN_DIR=${BIN_DIR:-/var/cache/pipe-k8s/bin}
SRCLIST=/etc/apt/sources.list.d/pipe-k8s-src.sources
export PATH=$PATH:/usr/sbin:/sbin
KEY=$(cat "$HERE/build.sh" "$HERE"/patches/*.patch | sha256sum | cut -d' ' -f1)
if [ -f "$BIN_DIR/BUILD_KEY" ] && [ "$(cat "$BIN_DIR/BUILD_KEY")" = "$KEY" ] && (cd "$BIN_DIR" && sha256sum -c --quiet SHA256SUMS); then
  command -v etcd >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
  echo "reusing $BIN_DIR (build key $KEY)" >&2; exit 0
fi
ts() { date +%s.%N; }
step() { local n=$1 t; shift; t=$(ts); "$@"; printf '%-26s %7.1f s\n' "$n" "$(awk -v a="$(ts)" -v b="$t" 'BEGIN{print a-b}')" | tee -a "$BUILD_DIR/times.txt" >&2; }
mkdir -p "$BUILD_DIR" "$BIN_DIR"; : > "$BUILD_DIR/times.txt"

cleanup_src() { if [ -f "$SRCLIST" ]; then rm -f "$SRCLIST"; apt-get update -qq || true; fi; }
apt_setup() {
  # deb-src is not configured on these machines: a temporary source list, removed on exit
  cat > "$SRCLIST" <<'S'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
S
  trap cleanup_src EXIT
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
     golang-go etcd-server dpkg-dev gcc libc6-dev rsync jq make patch zstd >/dev/null
}
fetch_src() {
  cd "$BUILD_DIR"
  if [ ! -d src ]; then
    apt-get source --download-only kubernetes >/dev/null 2>&1
    dpkg-source -x kubernetes_*.dsc src >/dev/null     # applies Debian's own patches
  fi
  mkdir -p src/.go/src/k8s.io; ln -sfn ../../.. src/.go/src/k8s.io/kubernetes   # GOPATH layout (k8s <= 1.22)
  cleanup_src; trap - EXIT
}
apply_patches() {
  cd "$BUILD_DIR/src"
  for p in "$HERE"/patches/*.patch; do
    if patch -p1 -R --dry-run -s -f < "$p" >/dev/null 2>&1; then echo "already applied: $(basename "$p")" >&2
    else patch -p1 -s -f --no-backup-if-mismatch < "$p"; echo "applied: $(basename "$p")" >&2; fi
  done
}
mk() {
  cd "$BUILD_DIR/src"
  GOPATH=$PWD/.go CGO_ENABLED=0 GOPROXY=off GOFLAGS= HOME=$BUILD_DIR/home GOCACHE=$BUILD_DIR/gocache \
  KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_TREE_STATE=clean KUBE_GIT_COMMIT=debian-src \
    make WHAT="$1" >"$BUILD_DIR/make-$(basename "$1").log" 2>&1 || { tail -30 "$BUILD_DIR/make-$(basename "$1").log" >&2; return 1; }
}
pause() {   # the pod sandbox binary, from the same tree (no registry needed)
  gcc -Os -static -DVERSION=v3.4.1-k8s-lab -o "$BIN_DIR/pause" "$BUILD_DIR/src/build/pause/linux/pause.c" && strip "$BIN_DIR/pause"
}
step apt-setup              apt_setup
step fetch+extract          fetch_src
step patches                apply_patches
step kube-apiserver         mk cmd/kube-apiserver
step kube-controller-manager mk cmd/kube-controller-manager
step kube-scheduler         mk cmd/kube-scheduler
step kubelet                mk cmd/kubelet
step pause                  pause
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet; do
  install -m 0755 "$BUILD_DIR/src/_output/bin/$b" "$BIN_DIR/$b"; done
cd "$BIN_DIR"
sha256sum kube-apiserver kube-controller-manager kube-scheduler kubelet pause > SHA256SUMS
stat -c '%n %s' kube-apiserver kube-controller-manager kube-scheduler kubelet pause > SIZES
echo "$KEY" > BUILD_KEY
cat "$BIN_DIR/SHA256SUMS" "$BIN_DIR/SIZES"
