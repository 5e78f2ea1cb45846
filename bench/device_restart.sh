#!/usr/bin/env bash
# Policy node restart on a bare GPU machine that has torch but not lerobot (the device machine): a cold
# start, warm restarts reusing the compile cache, and a restart with torch's caches off (bench/policy_restart.py).
#
# Run from the repository root, with the wheels carried in .whl/ (as for bench/device_policy.sh):
#   bash bench/device_restart.sh [extra bench.policy_restart arguments]
#   DEVICE=cpu SIZE=tiny OPTIONS=compile=true,fast_unet=true bash bench/device_restart.sh   # CPU smoke run
# What it measures, per start of the real node (python -m nodes.policy) with the default-size DiffusionPolicy
# and the fast options (bf16, compile, CUDA graphs, fast UNet) on cuda: seconds from spawning the process to
# the first chunk a client receives, and the node's split of it (imports, LeRobot + checkpoint, warm-up).
# Results: $OUT/restart.json (every start), $OUT/restart.md (table), $OUT/restart.log, $OUT/env.txt.
set -uo pipefail
OUT="${OUT:-/tmp/armpipe-bench}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# lerobot 0.6.1 and what it needs beyond the machine's own torch/numpy/opencv, plus pyzmq for the node's
# socket: installed without dependencies. Skipped where lerobot is importable already (e.g. the dev venv).
if ! python3 -c "import lerobot, zmq" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi

# A byte-compiled install, as .ci/setup and the Docker image make: the machine's torch ships without .pyc
# files in a read-only tree, so every start compiled ~3000 modules again (7 s of each start, found with
# bench/policy_load_profile.py). The bytecode goes under a writable prefix, compiled once here.
export PYTHONPYCACHEPREFIX="${PYTHONPYCACHEPREFIX:-/tmp/armpipe-pycache}"
compile_started=$(date +%s.%N)
roots=$(python3 -c "import importlib.util, os; print(' '.join(sorted({os.path.dirname(importlib.util.find_spec(n).origin) for n in ('torch', 'torchvision', 'lerobot', 'diffusers')})))")
python3 -m compileall -q -j 0 $roots "$PWD" > /dev/null || echo "compileall: some files failed"
compile_s=$(python3 -c "import time; print(f'{time.time() - $compile_started:.0f}')")

{
  echo "bytecode: compiled in ${compile_s} s under $PYTHONPYCACHEPREFIX (dont_write_bytecode: $(python3 -c "import sys; print(sys.flags.dont_write_bytecode)"))"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "load average: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
} 2>&1 | tee "$OUT/env.txt"

timeout "${BENCH_TIMEOUT_S:-540}" python3 -m bench.policy_restart --device "${DEVICE:-cuda}" --size "${SIZE:-default}" \
  --options "${OPTIONS:-dtype=bf16,compile=true,cuda_graphs=true,fast_unet=true}" \
  --out "$OUT/restart.json" --markdown "$OUT/restart.md" "$@" 2>&1 | tee "$OUT/restart.log" \
  | grep -E "RESULT|Error|error|Traceback" | cut -c1-400
status=${PIPESTATUS[0]}
[ -f "$OUT/restart.md" ] && cat "$OUT/restart.md"
exit "$status"
