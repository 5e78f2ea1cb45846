#!/usr/bin/env bash
# Runs a built image's entrypoint (or its HEALTHCHECK) without a container runtime: for machines where
# `podman run` cannot start containers (a sandbox that forbids setrlimit). The image's filesystem is
# exported into ROOT once per image id, then the command runs chroot-ed into it as the image's user, in its
# working directory, with the image's environment plus the caller's TASK, MODEL_PATH, HOST, PORT, DEVICE,
# CONFIG, INSECURE, STANDBY, CURVE_* and ARMPIPE_LOG_LEVEL, and the host's network (no namespace of its own).
#
#   sudo docker/run-exported.sh IMAGE ROOT [--checkpoint DIR] [--mount SRC:DST ...] [--healthcheck] [-- ARGS...]
#
# --checkpoint DIR   bind-mounted read-only at /checkpoint (the image's volume)
# --mount SRC:DST    another read-only bind mount (key files, a deployment file)
# --healthcheck      run the image's HEALTHCHECK command inside a running entrypoint's ROOT (as `docker
#                    exec` would); it mounts nothing itself
# ARGS               appended to the entrypoint, as after `docker run IMAGE`
set -euo pipefail

log() { printf '[run-exported] %s\n' "$*" >&2; }
usage() { sed -n '8,15p' "$0" >&2; exit 1; }

[ $# -ge 2 ] || usage
image="$1" root="$2"
shift 2
checkpoint="" healthcheck=0 mounts=()
while [ $# -gt 0 ]; do
  case "$1" in
    --checkpoint) checkpoint="$2"; shift 2 ;;
    --mount) mounts+=("$2"); shift 2 ;;
    --healthcheck) healthcheck=1; shift ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
[ "$(id -u)" = 0 ] || { log "needs root (chroot, mounts)"; exit 1; }

image_id="$(podman image inspect --format '{{.Id}}' "$image")"
if [ "$(cat "$root/.armpipe-image-id" 2>/dev/null)" != "$image_id" ]; then
  log "exporting $image into $root"
  rm -rf "$root"
  mkdir -p "$root"
  container="$(podman create "$image")"
  podman export "$container" | tar -x -C "$root"
  podman rm "$container" >/dev/null
  echo "$image_id" > "$root/.armpipe-image-id"
fi

inspect() { podman image inspect --format "$1" "$image"; }
user="$(inspect '{{.Config.User}}')"
workdir="$(inspect '{{.Config.WorkingDir}}')"
uid_gid="$(awk -F: -v u="${user:-root}" '$1 == u || $3 == u { print $3 ":" $4 }' "$root/etc/passwd")"
[ -n "$uid_gid" ] || { log "user '$user' not in the image's /etc/passwd"; exit 1; }
home="$(awk -F: -v u="${user:-root}" '$1 == u || $3 == u { print $6 }' "$root/etc/passwd")"

if [ "$healthcheck" = 1 ]; then
  # Docker's HEALTHCHECK test: ["CMD", arg, ...] or ["CMD-SHELL", line].
  mapfile -t command < <(inspect '{{range .Config.Healthcheck.Test}}{{println .}}{{end}}' | sed '/^$/d')
  case "${command[0]:-}" in
    CMD) command=("${command[@]:1}") ;;
    CMD-SHELL) command=(/bin/sh -c "${command[1]}") ;;
    *) log "$image has no HEALTHCHECK (built without --format docker?)"; exit 1 ;;
  esac
else
  mapfile -t command < <(inspect '{{range .Config.Entrypoint}}{{println .}}{{end}}' | sed '/^$/d')
  command+=("$@")
fi

# The image's environment, then the caller's settings on top.
environment=()
while IFS= read -r line; do
  [ -n "$line" ] && environment+=("$line")
done < <(inspect '{{range .Config.Env}}{{println .}}{{end}}')
environment+=("HOME=$home")
for name in TASK MODEL_PATH HOST PORT DEVICE CONFIG INSECURE STANDBY ARMPIPE_LOG_LEVEL HEALTHCHECK_ENDPOINT \
            $(compgen -v | grep '^CURVE_' || true); do
  [ -n "${!name+set}" ] && environment+=("$name=${!name}")
done

# Mounts this run adds and removes again. The entrypoint run owns ROOT while it runs; a health check run
# joins it (like `docker exec`) and mounts nothing, using the running one's /proc, /dev and volumes.
if [ "$healthcheck" = 1 ]; then
  mountpoint -q "$root/proc" || { log "no run of $image in $root to check: start the entrypoint first"; exit 1; }
  exec chroot --userspec="$uid_gid" "$root" /usr/bin/env -i "${environment[@]}" \
    /bin/sh -c 'cd "$0" && exec "$@"' "${workdir:-/}" "${command[@]}"
fi
if mountpoint -q "$root/proc"; then
  log "$root is in use by another run (its /proc is mounted): stop that one first, or use another ROOT"
  exit 1
fi
mounted=()
cleanup() {
  local index
  for ((index = ${#mounted[@]} - 1; index >= 0; index--)); do umount -l "${mounted[index]}" || true; done
}
trap cleanup EXIT
bind() {  # bind SRC DST [ro]
  mkdir -p "$2"
  mount --rbind "$1" "$2"
  [ "${3:-}" = ro ] && mount -o remount,bind,ro "$2"
  mounted+=("$2")
}
mount -t proc proc "$root/proc"
mounted+=("$root/proc")
bind /dev "$root/dev"
[ -n "$checkpoint" ] && bind "$(realpath "$checkpoint")" "$root/checkpoint" ro
for spec in "${mounts[@]}"; do bind "$(realpath "${spec%%:*}")" "$root/${spec#*:}" ro; done

# The command runs as a child so that this script can forward SIGTERM/SIGINT (as `docker stop` would)
# and still unmount afterwards.
chroot --userspec="$uid_gid" "$root" /usr/bin/env -i "${environment[@]}" \
  /bin/sh -c 'cd "$0" && exec "$@"' "${workdir:-/}" "${command[@]}" &
child=$!
forwarded=0
trap 'forwarded=1; kill -TERM "$child" 2>/dev/null || true' TERM INT
status=0
wait "$child" || status=$?
# A trapped signal ends `wait` early with 128 + its number (143), whether or not the child has ended: wait
# again for the child's own exit code (bash keeps it for a child that has already ended).
if [ "$forwarded" = 1 ]; then status=0; wait "$child" || status=$?; fi
exit "$status"
