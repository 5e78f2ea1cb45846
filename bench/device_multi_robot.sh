#!/usr/bin/env bash
# bench/multi_robot.py on a bare GPU machine that has torch but not lerobot (the device machine): N robot
# processes at 30 Hz against one policy node, batching off and on, DiffusionPolicy DDIM-10 with the fast
# options, then ACT. Run from the repository root, with the wheels carried in .whl/ (docs/benchmarks.md):
#   bash bench/device_multi_robot.sh
# Results: $OUT/multi-robot.jsonl (one JSON object per row), $OUT/multi-robot-*.md (the tables), $OUT/*.log.
set -uo pipefail
OUT="${OUT:-/tmp/armpipe-bench}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/env.txt"
ROBOTS="${ROBOTS:-1,4,8,16}"
DURATION="${DURATION:-5}"
run() {  # name, then bench.multi_robot arguments
  local name="$1"; shift
  timeout "${BENCH_TIMEOUT_S:-270}" python3 -m bench.multi_robot --device cuda --size default --robots "$ROBOTS" \
    --rate 30 --duration "$DURATION" --min-replies "${MIN_REPLIES:-300}" --settle-s 1 --start-s 2 --work-dir "/tmp/multi-robot-$name" \
    --out "$OUT/multi-robot.jsonl" --markdown "$OUT/multi-robot-$name.md" "$@" > "$OUT/multi-robot-$name.log" 2>&1
  echo "== $name (exit $?)"; grep -E "^\||^###|Error|Traceback" "$OUT/multi-robot-$name.log" | cut -c1-300
  tail -n 3 /tmp/multi-robot-"$name"/policy-on.log 2>/dev/null | cut -c1-300
}
# The fast options with torch.compile (issue 22's): batch 1 compiles for its shape and one more compile, with a
# symbolic batch dimension, serves every larger bucket (nodes/policy/engines.py, COMPILE_NOTE); the batching-off
# node's batch-1 code is reused by the batching-on node from the compile cache (same run_dir). COMPILE=false
# drops compile (bf16, CUDA graphs and the fast UNet stay), as the first H100 run did.
COMPILE="${COMPILE:-true}"
run diffusion --policy-type diffusion --fast --ddim10 "--policy.compile=$COMPILE"
run act --policy-type act --fast "--policy.compile=$COMPILE"
# Keep the node logs of the batching-on runs (capacity lines) for the record.
for name in diffusion act; do
  grep -E "chunks in|batching:|start-up:|CUDA graph" "/tmp/multi-robot-$name/policy-on.log" > "$OUT/policy-on-$name.log" 2>/dev/null
done
