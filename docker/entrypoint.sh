#!/bin/sh
# Entrypoint of the policy server image: maps the container's environment onto the policy node's command
# line (docs/operations.md, "Docker", has the table), then replaces itself with the node, so `docker stop`
# (SIGTERM) reaches Python and the node closes its socket cleanly; with STANDBY=1, with docker/standby.py,
# which runs the node twice under supervisord and passes SIGTERM on. Arguments given to `docker run IMAGE ...`
# are appended as further overrides, e.g. `--policy.dtype=bf16 --policy.cuda_graphs=true`.
set -eu

fail() {
  echo "entrypoint: $*" >&2
  exit 2  # like the node's own config errors: a restart cannot fix it
}

# A value as a YAML single-quoted string: the node parses each override as YAML, and a path such as
# `/ckpt/2024: best` or `yes` must stay a string.
yaml_str() {
  printf "'%s'" "$(printf '%s' "$1" | sed "s/'/''/g")"
}

TASK="${TASK:-lift}"
MODEL_PATH="${MODEL_PATH:-/checkpoint}"
HOST="${HOST:-0.0.0.0}"
PORT="${PORT:-8000}"
DEVICE="${DEVICE:-cuda}"
CONFIG="${CONFIG:-/app/configs/${TASK}.yaml}"

[ -f "$CONFIG" ] || fail "no deployment file $CONFIG (TASK=$TASK: the image has $(cd /app/configs && ls ./*.yaml | sed 's|^\./||; s|\.yaml$||' | tr '\n' ' ')or mount your own file and set CONFIG)"
case "$PORT" in
  ''|*[!0-9]*) fail "PORT: expected a TCP port number 1..65535, got '$PORT'" ;;
esac
[ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] || fail "PORT: expected a TCP port number 1..65535, got '$PORT'"
[ -n "$HOST" ] || fail "HOST: expected an address to bind (0.0.0.0: every interface), got an empty value"
case "$DEVICE" in
  cpu|cuda|auto) ;;
  *) fail "DEVICE: expected one of cpu, cuda, auto, got '$DEVICE'" ;;
esac
[ -e "$MODEL_PATH" ] || fail "MODEL_PATH: no checkpoint at $MODEL_PATH (mount it, e.g. -v /data/ckpt/pretrained_model:/checkpoint:ro)"
# safetensors writes its files 0600: a checkpoint copied as-is is unreadable to this non-root user, and
# LeRobot would then report the file as missing.
unreadable="$(find "$MODEL_PATH" ! -readable -print -quit 2>/dev/null || true)"
[ -z "$unreadable" ] || fail "MODEL_PATH: $unreadable is not readable by uid $(id -u) (the image's user): \
on the host, chmod -R a+rX the checkpoint, or run the container with --user $(stat -c %u "$unreadable")"

# CURVE (docs/operations.md, "Keys"): binding anything but loopback turns it on, and then the node needs
# its secret certificate and the allowed clients' directory, or it exits 2 naming the missing field.
readable_by_me() {  # readable_by_me VAR PATH: the key file or directory must be readable by this user
  [ -e "$2" ] || fail "$1: no such file or directory: $2 (mount the key directory, e.g. -v \$PWD/keys:/keys:ro)"
  [ -r "$2" ] || fail "$1: $2 is not readable by uid $(id -u) (the image's user): on the host, \
chown $(id -u) the key files (keep the secret ones mode 0600), or run the container with --user $(stat -c %u "$2")"
}
[ -z "${CURVE_SECRET_KEY:-}" ] || readable_by_me CURVE_SECRET_KEY "$CURVE_SECRET_KEY"
[ -z "${CURVE_CLIENTS_DIR:-}" ] || readable_by_me CURVE_CLIENTS_DIR "$CURVE_CLIENTS_DIR"
[ -z "${CURVE_HEALTHCHECK_KEY:-}" ] || readable_by_me CURVE_HEALTHCHECK_KEY "$CURVE_HEALTHCHECK_KEY"
case "${INSECURE:-}" in
  ''|0|false|1|true) ;;
  *) fail "INSECURE: expected 1/true or 0/false (or unset), got '$INSECURE'" ;;
esac
case "${STANDBY:-}" in
  ''|0|false|1|true) ;;
  *) fail "STANDBY: expected 1/true or 0/false (or unset), got '$STANDBY'" ;;
esac

# The mapped overrides go first and the caller's arguments last, so that those win (the node applies
# overrides in order). POSIX sh has one array, "$@": append to it, then rotate the caller's to the end.
caller_args=$#
set -- "$@" --config "$CONFIG" \
  "--policy.checkpoint=$(yaml_str "$MODEL_PATH")" \
  "--policy.bind=$(yaml_str "tcp://$HOST:$PORT")" \
  "--policy.device=$DEVICE"
[ -z "${CURVE_SECRET_KEY:-}" ] || set -- "$@" "--policy.server_secret_key_file=$(yaml_str "$CURVE_SECRET_KEY")"
[ -z "${CURVE_CLIENTS_DIR:-}" ] || set -- "$@" "--policy.allowed_clients_dir=$(yaml_str "$CURVE_CLIENTS_DIR")"
case "${INSECURE:-}" in 1|true) set -- "$@" --insecure=true ;; esac
while [ "$caller_args" -gt 0 ]; do
  set -- "$@" "$1"
  shift
  caller_args=$((caller_args - 1))
done

# STANDBY=1: the node twice under supervisord, one serving and one loaded, taking over within a second
# when the serving one ends (docker/standby.py). Otherwise the node itself is the container's process.
case "${STANDBY:-}" in
  1|true) exec python /app/docker/standby.py "$@" ;;
esac
exec python -m nodes.policy "$@"
