"""Policy node start-up: a cold start, restarts with the compile cache warm, and restarts with torch's caches off.

    python -m bench.policy_restart --device cuda --size default [--warm 2] [--options dtype=bf16,compile=true,...]
                                   [--out restart.json] [--markdown restart.md]

Each start is the real node (``python -m nodes.policy --config ...``) as supervisord would run it, on a
deployment config written for the run (task lift: 2 cameras 480x640 + 6 joints; an untrained checkpoint
of the given size built first by ``common.tools.checkpoint_maker``). Measured per start, on this
machine's monotonic clock:

- ``first_chunk_s``: from spawning the process to the first chunk a client receives (the client sends
  ``infer`` requests from the moment of the spawn, 1 s per attempt, until one is answered). The node
  binds its socket only after its warm-up, so this is what a restart costs the robot;
- the node's own split of it (its ``start-up:`` log line): interpreter + torch imports, LeRobot +
  checkpoint load, warm-up passes (torch.compile, CUDA graph recording), and the compile cache state.

Starts, in this order, each after the previous node was stopped (``--signal``, default SIGKILL: a crash):
1. ``cold``: an empty compile cache (``policy.compile_cache`` pointing at a fresh directory);
2. ``warm`` x ``--warm``: the same cache directory, filled by the starts before;
3. ``no-cache``: ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``, i.e. a restart that recompiles everything.
``restart.json`` keeps every start; the Markdown is one table row per start plus the ratio cold / warm.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.harness import write_config
from common.config import REPO_ROOT, load_config
from common.wire.policy_client import PolicyClient
from common.wire.transport import PeerUnavailable, SocketFactory

log = logging.getLogger("bench.policy_restart")
FAST_OPTIONS = "dtype=bf16,compile=true,cuda_graphs=true,fast_unet=true"
STARTUP_LINE = re.compile(r"start-up: ([\d.]+) s to ready \(imports ([\d.]+) s, LeRobot \+ checkpoint ([\d.]+) s, "
                          r"warm-up ([\d.]+) s\)(?:; compile cache (.*))?")
SPLIT_LINE = re.compile(r"start-up split of LeRobot \+ checkpoint: (.*)")


def parse_options(text: str) -> dict[str, Any]:
    """``a=1,b=true`` -> ``{"a": 1, "b": True}`` (values parsed as YAML, like the node's overrides)."""
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--options: expected key=value items, got {item!r}")
        options[key.strip()] = yaml.safe_load(value)
    return options


def build(workdir: Path, size: str) -> Path:
    """An untrained DiffusionPolicy checkpoint for task lift, built in its own process (this one stays torch-free)."""
    output = workdir / f"ckpt-{size}"
    subprocess.run([sys.executable, "-m", "common.tools.checkpoint_maker", "--config",
                    str(REPO_ROOT / "configs" / "lift.yaml"), "--policy-type", "diffusion", "--size", size,
                    "--output", str(output)], cwd=REPO_ROOT, check=True, timeout=600)
    return output / "pretrained_model"


def observation(config_path: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    config = load_config(config_path)
    images = {name: np.full((cam.height, cam.width, 3), 128, dtype=np.uint8) for name, cam in config.cameras.items()}
    lower = np.asarray(config.lower_limits(), dtype=np.float32)
    upper = np.asarray(config.upper_limits(), dtype=np.float32)
    return images, (lower + upper) / 2


def one_start(kind: str, config_path: Path, log_path: Path, *, env: dict[str, str], timeout_s: float,
              stop_signal: int) -> dict[str, Any]:
    """Spawn the node, time the first chunk a client gets, stop the node; the node's start-up split from its log."""
    config = load_config(config_path)
    images, state = observation(config_path)
    factory = SocketFactory()
    client = PolicyClient(factory, config.policy.endpoint, client_id=f"restart-{kind}", timeout_s=1.0, retries=1)
    with log_path.open("w") as log_file:
        spawned = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", "nodes.policy", "--config", str(config_path)], cwd=REPO_ROOT,
                                   env=env, stdout=log_file, stderr=subprocess.STDOUT)
        first_chunk_s = None
        try:
            while time.monotonic() - spawned < timeout_s and process.poll() is None:
                try:
                    client.infer(images, state, obs_t=time.monotonic())
                except PeerUnavailable:
                    continue
                first_chunk_s = time.monotonic() - spawned
                break
        finally:
            client.close()
            factory.context.term()
            if process.poll() is None:
                process.send_signal(stop_signal)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    text = log_path.read_text(errors="replace")
    result: dict[str, Any] = {"kind": kind, "first_chunk_s": first_chunk_s, "exit_code": process.returncode}
    match = STARTUP_LINE.search(text)
    if match:
        result.update(ready_s=float(match[1]), imports_s=float(match[2]), load_s=float(match[3]),
                      warmup_s=float(match[4]), compile_cache=match[5] or "")
    split = SPLIT_LINE.search(text)
    if split:
        result["load_split"] = split[1].strip()
    if first_chunk_s is None:
        result["log_tail"] = text.splitlines()[-15:]
        log.error("%s start: no chunk within %.0f s; log tail:\n%s", kind, timeout_s, "\n".join(result["log_tail"]))
    else:
        log.info("RESULT %s start: first chunk after %.1f s %s", kind, first_chunk_s,
                 {key: result.get(key) for key in ("imports_s", "load_s", "load_split", "warmup_s", "compile_cache")})
    return result


def failover(config_path: Path, workdir: Path, *, env: dict[str, str], timeout_s: float, tries: int,
             stop_signal: int) -> list[float]:
    """``policy.standby``: two nodes on one endpoint (the second named ``policy-standby``, as supervisord
    names it); each try stops the serving one with ``stop_signal`` and times, from the signal, the first
    chunk a client gets from the standby. The stopped one is started again and becomes the next standby."""
    config = load_config(config_path)
    images, state = observation(config_path)
    ready_dir = config.resolve(config.run_dir) / "ready"
    names = ["policy", "policy-standby"]
    processes: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(name: str) -> None:
        log_file = (workdir / f"failover-{name}.log").open("ab")
        processes[name] = subprocess.Popen([sys.executable, "-m", "nodes.policy", "--config", str(config_path)],
                                           cwd=REPO_ROOT, env={**env, "SUPERVISOR_PROCESS_NAME": name},
                                           stdout=log_file, stderr=subprocess.STDOUT)

    def ready(name: str) -> dict[str, Any]:
        path = ready_dir / f"{name}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def wait(condition: Any, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise SystemExit(f"failover: {what} within {timeout_s:.0f} s")
            time.sleep(0.05)

    factory = SocketFactory()
    client = PolicyClient(factory, config.policy.endpoint, client_id="failover", timeout_s=5.0, retries=1)
    takeovers: list[float] = []
    try:
        for name in names:
            spawn(name)
            wait(lambda name=name: ready(name).get("pid") == processes[name].pid, f"{name} not ready")
        def live(name: str) -> dict[str, Any]:  # the ready file of the running process, not a killed one's
            detail = ready(name)
            return detail if detail.get("pid") == processes[name].pid else {}

        for attempt in range(tries):
            wait(lambda: all(live(name) for name in names), "both nodes not ready")
            serving = next(name for name in names if live(name).get("serving"))
            standby = next(name for name in names if name != serving)
            client.infer(images, state, obs_t=time.monotonic())
            processes[serving].send_signal(stop_signal)
            stopped = time.monotonic()
            while True:
                try:
                    client.infer(images, state, obs_t=time.monotonic())
                    break
                except PeerUnavailable:
                    if time.monotonic() - stopped > timeout_s:
                        raise SystemExit("failover: the standby never served") from None
            takeovers.append(time.monotonic() - stopped)
            log.info("RESULT failover %d: %s -> %s, first chunk %.2f s after %s", attempt + 1, serving, standby,
                     takeovers[-1], signal.Signals(stop_signal).name)
            processes[serving].wait(timeout=60)
            spawn(serving)  # as supervisord's autorestart would: the next standby
    finally:
        client.close()
        factory.context.term()
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return takeovers


def device_name(device: str) -> str:
    if device != "cpu":
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=30)
            if query.returncode == 0 and query.stdout.strip():
                return query.stdout.strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def to_markdown(summary: dict[str, Any]) -> str:
    lines = [f"Policy node start-up on {summary['device_name']} (`--policy.device={summary['device']}`), "
             f"{summary['size']} DiffusionPolicy, options `{summary['options']}`, stopped with {summary['signal']} "
             f"between starts, load average {summary['load_average']}.", "",
             "| start | first chunk s | imports s | LeRobot + checkpoint s | warm-up s | compile cache "
             "| split of LeRobot + checkpoint |",
             "|---|---:|---:|---:|---:|---|---|"]
    for start in summary["starts"]:
        def cell(key: str, start: dict[str, Any] = start) -> str:
            value = start.get(key)
            return f"{value:.1f}" if isinstance(value, float) else "-"
        lines.append(f"| {start['kind']} | {cell('first_chunk_s')} | {cell('imports_s')} | {cell('load_s')} | "
                     f"{cell('warmup_s')} | {start.get('compile_cache', '') or '-'} | {start.get('load_split', '-')} |")
    ratios = [f"{label}: **{summary[key]:.1f}x**" for key, label in (("cold_over_warm", "cold / warm"),
                                                                     ("nocache_over_warm", "caches off / warm"))
              if summary.get(key)]
    if ratios:
        lines += ["", "First chunk, " + "; ".join(ratios)]
    if summary.get("failover_s"):
        takeovers = summary["failover_s"]
        lines += ["", f"`policy.standby` take-over ({summary['signal']} to the serving node, then the first chunk "
                      f"from the standby), {len(takeovers)} tries: " + ", ".join(f"{t:.2f}" for t in takeovers)
                  + f" s (median {statistics.median(takeovers):.2f} s)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="policy.device (cuda, cpu)")
    parser.add_argument("--size", default="default", choices=["tiny", "default"])
    parser.add_argument("--options", default=FAST_OPTIONS, help=f"policy.* settings (default: {FAST_OPTIONS})")
    parser.add_argument("--warm", type=int, default=2, help="warm restarts after the cold start")
    parser.add_argument("--no-cache-start", action=argparse.BooleanOptionalAction, default=True,
                        help="end with a start that has torch's compile caches switched off")
    parser.add_argument("--signal", default="SIGKILL", choices=["SIGKILL", "SIGTERM"])
    parser.add_argument("--failover", type=int, default=0,
                        help="after the starts: this many take-overs of a policy.standby pair (0: none)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per start")
    parser.add_argument("--checkpoint", type=Path, help="use this checkpoint instead of building one")
    parser.add_argument("--workdir", type=Path, help="keep the run's files here (default: a temporary directory)")
    parser.add_argument("--out", type=Path, help="JSON with every start")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("common.wire.transport").setLevel(logging.WARNING)  # "no reply ... reconnecting" until up
    options = parse_options(args.options)
    with tempfile.TemporaryDirectory(prefix="armpipe-restart-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint = args.checkpoint or build(workdir, args.size)
        cache = workdir / "compile-cache"
        shutil.rmtree(cache, ignore_errors=True)  # the first start is cold even in a reused --workdir
        config_path = write_config(workdir, "lift", {"policy": {
            **options, "checkpoint": str(checkpoint), "device": args.device, "compile_cache": str(cache),
            "warmup": 1}})
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # the config's compile_cache decides, as in a deployment
        stop_signal = getattr(signal, args.signal)
        plan = [("cold", env)] + [("warm", env)] * args.warm
        if args.no_cache_start:
            plan.append(("no-cache", {**env, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}))
        starts = [one_start(kind, config_path, workdir / f"policy-{index}-{kind}.log", env=start_env,
                            timeout_s=args.timeout, stop_signal=stop_signal)
                  for index, (kind, start_env) in enumerate(plan)]
        takeovers = failover(config_path, workdir, env=env, timeout_s=args.timeout, tries=args.failover,
                             stop_signal=stop_signal) if args.failover else []
    first = {kind: [s["first_chunk_s"] for s in starts if s["kind"] == kind and s["first_chunk_s"] is not None]
             for kind in ("cold", "warm", "no-cache")}
    warm = statistics.median(first["warm"]) if first["warm"] else None
    summary = {
        "device": args.device, "device_name": device_name(args.device), "size": args.size, "options": args.options,
        "signal": args.signal, "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()), "starts": starts,
        "failover_s": takeovers,
        "warm_first_chunk_s": warm,
        "cold_over_warm": first["cold"][0] / warm if first["cold"] and warm else None,
        "nocache_over_warm": first["no-cache"][0] / warm if first["no-cache"] and warm else None,
    }
    table = to_markdown(summary)
    log.info("\n%s", table)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if any(start["first_chunk_s"] is None for start in starts):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
