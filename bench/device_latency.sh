#!/usr/bin/env bash
# The latency bench on a bare GPU machine that has torch but not lerobot (the device machine), the robot
# side (servo emulator, state-reader, cameras, actuator) on the same host.
#
# Run from the repository root, with the wheels carried in .whl/ (see docs/benchmarks.md, "Latency"):
#   bash bench/device_latency.sh CASE [CASE ...]      CASE: ddim10 | ddpm100 | act
# Results: $OUT/<case>.json / .md / .png, $OUT/latency.log (everything), $OUT/env.txt.
set -uo pipefail
OUT="${OUT:-/tmp/armpipe-latency}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
SECONDS_PER_VARIANT="${LATENCY_SECONDS:-15}"
PYTHON="${PYTHON:-python3}"
# Smoke test off the GPU machine: LATENCY_DEVICE=cpu LATENCY_SIZE=tiny LATENCY_FAST= PYTHON=.venv/bin/python SKIP_WHEELS=1
DEVICE="${LATENCY_DEVICE:-cuda}" SIZE="${LATENCY_SIZE:-default}" FAST="${LATENCY_FAST---fast}"

[[ -n "${SKIP_WHEELS:-}" ]] || "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD"
[[ -z "${SKIP_WHEELS:-}" ]] || export PYTHONPATH="$PWD"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  nproc
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

work=/tmp/armpipe-latency-work
for case in "$@"; do
  case "$case" in
    ddim10) args=(--policy-type diffusion --steps 10 --scheduler DDIM --label "DDIM-10"
                  --variants armpipe-raw,armpipe-jpeg,openpi-ws,lerobot-grpc --no-grpc-act) ;;
    ddpm100) args=(--policy-type diffusion --steps 100 --scheduler DDPM --label "DDPM-100"
                   --variants armpipe-raw,armpipe-jpeg,openpi-ws) ;;
    act) args=(--policy-type act --label "ACT" --variants armpipe-raw,armpipe-jpeg,openpi-ws,lerobot-grpc) ;;
    *) echo "unknown case $case (ddim10 | ddpm100 | act)"; exit 2 ;;
  esac
  # The diffusion cases share one checkpoint (the first builds it).
  checkpoint=()
  if [[ "$case" != act && -d "$work/ddim10/checkpoint-diffusion/pretrained_model" ]]; then
    checkpoint=(--checkpoint "$work/ddim10/checkpoint-diffusion/pretrained_model")
  fi
  # shellcheck disable=SC2086  # FAST is one flag or nothing
  timeout "${CASE_TIMEOUT_S:-400}" "$PYTHON" -m bench.latency --device "$DEVICE" --size "$SIZE" $FAST \
    --seconds "$SECONDS_PER_VARIANT" --warmup 3 "${args[@]}" "${checkpoint[@]}" --work "$work/$case" \
    --out "$work/out-$case" >> "$OUT/latency.log" 2>&1
  echo "== $case: exit $?"
  for ext in json md png; do
    cp "$work/out-$case/latency.$ext" "$OUT/$case.$ext" 2>/dev/null
  done
  cat "$OUT/$case.md" 2>/dev/null || tail -40 "$OUT/latency.log"
done
