"""Seconds per import stage of the policy node, one after the other in one process (no threads, no profiler).

    python -m bench.import_stages [--device cuda]

Prints one line: torch, the device's context, torch._dynamo, torchvision, LeRobot's DiffusionPolicy modules
(narrow, as the node imports them), torch._inductor; and whether this interpreter writes bytecode. Used on
the GPU machine to tell a slow import from a slow CUDA start.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time

log = logging.getLogger("bench.import_stages")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    stages: list[tuple[str, float]] = []
    last = time.perf_counter()

    def mark(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        stages.append((name, now - last))
        last = now

    import torch

    mark("torch")
    if args.device != "cpu":
        torch.empty(1, device=args.device)
        torch.cuda.synchronize()
        mark(f"{args.device} context")
    importlib.import_module("torch._dynamo")
    mark("torch._dynamo")
    importlib.import_module("torchvision")
    mark("torchvision")
    from common.lerobot_guard import guard_lerobot_imports
    from nodes.policy import lerobot_import

    guard_lerobot_imports()
    lerobot_import.policy_class("diffusion")
    mark("lerobot diffusion (narrow)")
    importlib.import_module("torch._inductor.compile_fx")
    mark("torch._inductor")
    log.info("RESULT import stages: %s; dont_write_bytecode %s, pycache_prefix %s",
             ", ".join(f"{name} {seconds:.2f} s" for name, seconds in stages), sys.flags.dont_write_bytecode,
             sys.pycache_prefix)


if __name__ == "__main__":
    main()
