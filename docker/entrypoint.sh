#!/bin/sh
# Entrypoint of the policy server image: maps the container's environment onto the policy node's command
# line (docs/operations.md, "Docker", has the table), then replaces itself with the node, so `docker stop`
# (SIGTERM) reaches Python and the node closes its socket cleanly. Arguments given to `docker run IMAGE ...`
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

set -- --config "$CONFIG" \
  "--policy.checkpoint=$(yaml_str "$MODEL_PATH")" \
  "--policy.bind=$(yaml_str "tcp://$HOST:$PORT")" \
  "--policy.device=$DEVICE" \
  "$@"

exec python -m nodes.policy "$@"
