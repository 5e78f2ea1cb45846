#!/usr/bin/env bash
# SmolVLA, pi0 and pi0.5 (default size, random weights) served end to end by the policy node on a bare GPU
# machine that has torch but not lerobot (the device machine): bench/vla_serve.py.
#
# Run from the repository root, with the wheels carried in .whl/ (docs/benchmarks.md, "SmolVLA, pi0 and pi0.5"):
#   bash bench/device_vla.sh [extra bench.vla_serve arguments, e.g. --types pi0]
# Results: $OUT/vla-serve.jsonl, $OUT/vla-serve.md, $OUT/vla-serve.log, $OUT/env.txt.
set -uo pipefail
OUT="${OUT:-/tmp/armpipe-vla}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# lerobot 0.6.1 and what it needs beyond the machine's own torch/numpy, with transformers 5.5.4 and tokenizers
# 0.22.2 (LeRobot's range; the machine's own transformers is newer), num2words + docopt (SmolVLM's processor)
# and pyzmq: installed without dependencies, first on the path.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "
import importlib.metadata as md, sys, torch
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)
for name in ('lerobot', 'transformers', 'tokenizers', 'huggingface-hub', 'safetensors', 'scipy', 'pyzmq'):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, 'MISSING')
"
} 2>&1 | tee "$OUT/env.txt"

timeout "${BENCH_TIMEOUT_S:-560}" python3 -m bench.vla_serve --device cuda --size default --work /tmp/armpipe-vla-work \
  --out "$OUT" "$@" > "$OUT/vla-serve.log" 2>&1
echo "== exit $?"
grep -E "RESULT|Error|error|Traceback" "$OUT/vla-serve.log" | cut -c1-600
cat "$OUT/vla-serve.md" 2>/dev/null
for f in /tmp/armpipe-vla-work/node-*/policy.log; do echo "== $f"; tail -5 "$f" | cut -c1-400; done
