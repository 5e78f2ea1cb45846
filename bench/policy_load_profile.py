"""Where the policy node's checkpoint load goes: ``PolicyRuntime(config)`` under cProfile, in one process.

    python -m bench.policy_load_profile [--device cuda] [--size default] [--options dtype=bf16,...] [--top 30]
                                        [--checkpoint DIR] [--out FILE]

The node's own ``start-up split`` log line says which stage is slow (LeRobot import, weights, engine);
this says which functions inside it, by cumulative time. It builds the same untrained checkpoint as
``bench.policy_restart`` unless ``--checkpoint`` names one, and prints the stage split and the top
functions (``--out``: the same text to a file).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import tempfile
import time
from pathlib import Path

from bench.harness import write_config
from bench.policy_restart import FAST_OPTIONS, build, parse_options
from common.config import load_config

log = logging.getLogger("bench.policy_load_profile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="default", choices=["tiny", "default"])
    parser.add_argument("--options", default=FAST_OPTIONS)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="armpipe-load-profile-") as tmp:
        workdir = Path(tmp)
        checkpoint = args.checkpoint or build(workdir, args.size)
        config_path = write_config(workdir, "lift", {"policy": {
            **parse_options(args.options), "checkpoint": str(checkpoint), "device": args.device,
            "compile_cache": str(workdir / "compile-cache"), "warmup": 0}})
        config = load_config(config_path)
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        from nodes.policy.runtime import PolicyRuntime  # its imports are part of what a start pays

        runtime = PolicyRuntime(config)
        profiler.disable()
        total_s = time.perf_counter() - started
    text = io.StringIO()
    text.write(f"PolicyRuntime: {total_s:.1f} s ({runtime.startup.describe()})\n")
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.top)
    log.info("%s", text.getvalue())
    if args.out:
        args.out.write_text(text.getvalue())


if __name__ == "__main__":
    main()
