#!/usr/bin/env bash
# The policy GPU benchmark on a bare GPU machine that has torch but not lerobot (the device machine).
#
# Run from the repository root, with the wheels carried in .whl/ (see docs/benchmarks.md):
#   bash bench/device_policy.sh [extra bench.policy_gpu arguments]
# The flow-matching VLAs (issue 21; transformers 5.5.4 and tokenizers 0.22.2 come from .whl/ too; each default pi0 /
# pi0.5 checkpoint is ~9 GB on disk and ~2 min to build, so give it BENCH_TIMEOUT_S and delete as it goes):
#   BENCH_TIMEOUT_S=580 bash bench/device_policy.sh --cases smolvla,pi0:bf16-graphs,pi05:bf16-graphs \
#       --delete-checkpoints --workdir /tmp/vla-bench --iters 20
# Results: $OUT/bench-policy.jsonl (one JSON object per measurement, written as they come),
#          $OUT/bench-policy.md (the Markdown table), $OUT/bench-policy.log, $OUT/env.txt.
set -uo pipefail
OUT="${OUT:-/tmp/armpipe-bench}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# lerobot 0.6.1, draccus, mergedeep, diffusers, gymnasium, farama-notifications, msgpack-numpy, toml,
# termcolor: installed without dependencies next to the machine's own torch/numpy/opencv.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 - <<'EOF'
import importlib.metadata as md
from common.lerobot_guard import guard_lerobot_imports
guard_lerobot_imports()
import sys, torch, lerobot
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "lerobot", md.version("lerobot"), "diffusers", md.version("diffusers"))
for name in ("transformers", "peft"):
    try:
        print(name, md.version(name), "hidden from lerobot" if sys.modules.get(name, 0) is None else "visible")
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
} 2>&1 | tee "$OUT/env.txt"

timeout "${BENCH_TIMEOUT_S:-540}" python3 -m bench.policy_gpu --device cuda --size default --jpeg \
  --out "$OUT/bench-policy.jsonl" --markdown "$OUT/bench-policy.md" "$@" 2>&1 | tee "$OUT/bench-policy.log" \
  | grep -E "RESULT|Error|error|Traceback|FAILED|^\|" | cut -c1-400
