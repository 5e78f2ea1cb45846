#!/usr/bin/env bash
# Builds the policy server image on a machine that reaches Debian's mirror and PyPI but no image registry:
# debootstraps a minimal Debian rootfs (trixie: python3 is 3.13, and requirements.lock installs on it),
# imports it as the local base image, and builds docker/Dockerfile on it with podman.
#
#   sudo docker/build-local.sh [IMAGE]        # default IMAGE: localhost/armpipe-policy:local
#
# Environment: ARMPIPE_DOCKER_WORK (rootfs and logs; default /var/tmp/armpipe-docker, outside the repo),
# ARMPIPE_DEBIAN_SUITE (default trixie; bookworm's python3 is 3.11, too old), ARMPIPE_DEBIAN_MIRROR.
# The base image is made once and reused. The host's extra CA certificates (/usr/local/share/ca-certificates,
# e.g. a TLS-intercepting proxy's) are added to it so that pip and uv inside the build trust the same hosts.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[build-local] %s\n' "$*" >&2; }

image="${1:-localhost/armpipe-policy:local}"
work="${ARMPIPE_DOCKER_WORK:-/var/tmp/armpipe-docker}"
suite="${ARMPIPE_DEBIAN_SUITE:-trixie}"
mirror="${ARMPIPE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
base="localhost/armpipe-base:${suite}"

[ "$(id -u)" = 0 ] || { log "needs root (debootstrap, podman's chroot isolation)"; exit 1; }
for tool in debootstrap podman; do
  command -v "$tool" >/dev/null || { log "missing $tool: apt-get install debootstrap podman"; exit 1; }
done

if ! podman image exists "$base"; then
  rootfs="$work/rootfs-$suite"
  if [ ! -f "$rootfs/.armpipe-debootstrap-done" ]; then
    rm -rf "$rootfs"
    mkdir -p "$work"
    log "debootstrap $suite into $rootfs (log: $work/debootstrap-$suite.log)"
    debootstrap --variant=minbase --include=ca-certificates "$suite" "$rootfs" "$mirror" \
      >"$work/debootstrap-$suite.log" 2>&1 || { tail -20 "$work/debootstrap-$suite.log" >&2; exit 1; }
    touch "$rootfs/.armpipe-debootstrap-done"
  fi
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null
  fi
  log "importing $rootfs as $base"
  tar -C "$rootfs" --exclude=./.armpipe-debootstrap-done -c . | podman import - "$base" >/dev/null
fi

# --format docker keeps the HEALTHCHECK (the OCI image format has no field for it).
log "building $image on $base"
start=$(date +%s)
podman build --isolation chroot --format docker -f docker/Dockerfile --build-arg "BASE=$base" -t "$image" .
log "built $image in $(( $(date +%s) - start )) s: $(podman image inspect --format '{{.Size}}' "$image") bytes"
