#!/usr/bin/env bash
# Create the base images that stages/ and the tests build FROM, when the engine cannot pull them:
#   pipe-busybox:latest     from Debian's busybox-static (under a second; the tests' tiny image)
#   debian:bookworm-slim    from Debian's archive with debootstrap --variant=minbase (about 40 s)
# Where an engine can pull (a laptop), a pull is tried first, so the same Dockerfiles work unchanged.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
have() { docker image inspect "$1" >/dev/null 2>&1; }
apt_ready=
need_pkg() {
  dpkg -s "$1" >/dev/null 2>&1 && return 0
  [ -n "$apt_ready" ] || { apt-get update -qq; apt_ready=1; }
  apt-get install -y -qq "$1" >/dev/null
}

if ! have pipe-busybox:latest; then
  if timeout 20 docker pull -q busybox:stable >/dev/null 2>&1; then
    docker tag busybox:stable pipe-busybox:latest
  else
    need_pkg busybox-static
    root=$(mktemp -d)
    mkdir -p "$root"/bin "$root"/tmp "$root"/etc
    cp /bin/busybox "$root/bin/busybox"
    for applet in $("$root/bin/busybox" --list); do
      [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
    done
    echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
    echo 'root:x:0:' >"$root/etc/group"
    chmod 1777 "$root/tmp"
    tar -C "$root" -c . | docker import -c 'ENV PATH=/bin' -c 'CMD ["/bin/sh"]' - pipe-busybox:latest >/dev/null
    rm -rf "$root"
  fi
fi

if ! have debian:bookworm-slim; then
  if ! timeout 60 docker pull -q debian:bookworm-slim >/dev/null 2>&1; then
    need_pkg debootstrap
    root=$(mktemp -d)
    debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import \
      -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      -c 'CMD ["bash"]' - debian:bookworm-slim >/dev/null
    rm -rf "$root"
  fi
fi
docker image ls --format '{{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}' pipe-busybox; docker image ls --format '{{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}' debian
