"""Servo-bus benchmark: state read rate on the emulated bus, alone and with a writer sharing it.

    .venv/bin/python -m bench.bus_rate [--config configs/lift.yaml] [--arm main] [--seconds 10]
                                       [--writer-hz 30] [--no-lock-demo] [--markdown FILE]

Starts the servo emulator (``nodes.servo_emulator``) on a private pseudo-terminal, then runs each phase
with real processes, each opening the port through ``common.feetech_bus.ArmBus`` (LeRobot's driver,
OS lock per transaction):

1. ``reader alone``: one process reads Present_Position of the six servos back to back.
2. ``reader + writer``: the same, while a second process sync-writes goals at ``--writer-hz`` (the
   actuator's pattern: a sinusoid around the rest pose, so the emulated arm really moves).
3. ``--no-lock-demo``: as 2, but the two processes use DIFFERENT lock files, i.e. no mutual exclusion,
   to show what the lock prevents (expect failed / corrupt transactions).

Each phase reports reads/s, read latency p50/p99, client failures (corrupt replies, timeouts) on both
processes and the emulator's own counters of malformed packets.

The ``reader`` and ``writer`` roles are also used on their own by tests/test_shared_bus.py:

    python -m bench.bus_rate --role writer --config X --arm main --seconds 5 --writer-hz 50
prints one JSON line with the process's counters when done.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.harness import cpu_model

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

log = logging.getLogger("bench.bus_rate")


# ---------------------------------------------------------------------------------------------------
# Roles (each runs in its own process)
# ---------------------------------------------------------------------------------------------------
def _open_bus(config_path: str, arm_name: str, overrides: list[str]) -> Any:
    from common.config import load_config
    from common.feetech_bus import ArmBus

    config = load_config(config_path, overrides)
    bus = ArmBus(config.arms[arm_name], name=arm_name, lock_timeout_s=2.0)
    for attempt in range(5):  # like the nodes: a connect that fails on a busy machine is retried
        try:
            bus.connect()
            break
        except ConnectionError:
            if attempt == 4:
                raise
            time.sleep(1.0)
    return config, bus


def _wait_for_start(start_at: float) -> None:
    """Roles connect first (seconds of imports), then start together at a wall-clock instant."""
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)


def run_reader(config_path: str, arm_name: str, seconds: float, hz: float, start_at: float,
               overrides: list[str]) -> dict[str, Any]:
    from common.feetech_bus import BusLockTimeout, BusTransactionError

    _, bus = _open_bus(config_path, arm_name, overrides)
    _wait_for_start(start_at)
    latencies: list[float] = []
    errors = 0
    end = time.monotonic() + seconds
    next_tick = time.monotonic()
    while time.monotonic() < end:
        began = time.perf_counter()
        try:
            position = bus.read_positions()
            if not np.all(np.isfinite(position)):
                errors += 1
        except (BusTransactionError, BusLockTimeout):
            errors += 1
        latencies.append(time.perf_counter() - began)
        if hz > 0:
            next_tick += 1.0 / hz
            time.sleep(max(0.0, next_tick - time.monotonic()))
    bus.disconnect()
    return {"role": "reader", "seconds": seconds, "reads_per_s": bus.stats.reads / seconds,
            "latency_p50_ms": 1e3 * _percentile(latencies, 50), "latency_p99_ms": 1e3 * _percentile(latencies, 99),
            "raised": errors, **bus.stats.as_dict()}


def run_writer(config_path: str, arm_name: str, seconds: float, hz: float, start_at: float,
               overrides: list[str]) -> dict[str, Any]:
    from common.feetech_bus import BusLockTimeout, BusTransactionError

    config, bus = _open_bus(config_path, arm_name, overrides)
    arm = config.arms[arm_name]
    low, high = np.array(arm.lower_limits), np.array(arm.upper_limits)
    centre = np.array(arm.rest_pose) if arm.rest_pose else (low + high) / 2
    amplitude = np.array([20.0, 15.0, 15.0, 15.0, 30.0, 20.0])
    _wait_for_start(start_at)
    errors = 0
    commanded_min = np.full(6, np.inf)
    commanded_max = np.full(6, -np.inf)
    started = time.monotonic()
    end = started + seconds
    next_tick = started
    while time.monotonic() < end:
        phase = 2 * math.pi * 0.5 * (time.monotonic() - started)
        goals = np.clip(centre + amplitude * math.sin(phase), low, high).astype(np.float32)
        try:
            bus.write_goals(goals)
            commanded_min = np.minimum(commanded_min, goals)
            commanded_max = np.maximum(commanded_max, goals)
        except (BusTransactionError, BusLockTimeout):
            errors += 1
        next_tick += 1.0 / hz
        time.sleep(max(0.0, next_tick - time.monotonic()))
    bus.disconnect()
    return {"role": "writer", "seconds": seconds, "writes_per_s": bus.stats.writes / seconds, "raised": errors,
            "commanded_min": commanded_min.tolist(), "commanded_max": commanded_max.tolist(), **bus.stats.as_dict()}


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# ---------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------
def _role_command(role: str, config: Path, arm: str, seconds: float, hz: float, start_at: float,
                  overrides: list[str]) -> list[str]:
    return [PYTHON, "-m", "bench.bus_rate", "--role", role, "--config", str(config), "--arm", arm,
            "--seconds", str(seconds), "--hz", str(hz), "--start-at", str(start_at), *overrides]


def _run_roles(roles: list[tuple[str, float, list[str]]], config: Path, arm: str, seconds: float,
               warmup_s: float = 25.0) -> list[dict[str, Any]]:
    start_at = time.time() + warmup_s  # lets every process import LeRobot and connect first
    procs = [subprocess.Popen(_role_command(role, config, arm, seconds, hz, start_at, extra), cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, text=True) for role, hz, extra in roles]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=warmup_s + seconds + 120)
        if proc.returncode != 0:
            raise RuntimeError(f"role process failed with {proc.returncode}: {out[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _emulator_stats(run_dir: Path, arm: str) -> dict[str, Any]:
    return json.loads((run_dir / "stats" / f"servo_emulator-{arm}.json").read_text())


def orchestrate(args: argparse.Namespace) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="armpipe-bus-bench-"))
    raw = yaml.safe_load(Path(args.config).read_text())
    arm_raw = raw["arms"][args.arm]
    arm_raw["port"] = str(work / f"{args.arm}.tty")
    arm_raw["lock_file"] = str(work / f"{args.arm}.lock")
    raw["run_dir"] = str(work / "run")
    config = work / "bench.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    emulator = subprocess.Popen([PYTHON, "-m", "nodes.servo_emulator", "--config", str(config), "--name", args.arm],
                                cwd=REPO_ROOT)
    ready = work / "run" / "ready" / f"servo_emulator-{args.arm}.json"
    deadline = time.monotonic() + 30
    while not ready.exists():
        if time.monotonic() > deadline or emulator.poll() is not None:
            raise RuntimeError("servo emulator did not start")
        time.sleep(0.05)
    phases: list[tuple[str, list[tuple[str, float, list[str]]]]] = [
        ("reader alone", [("reader", 0.0, [])]),
        (f"reader + writer at {args.writer_hz:g} Hz", [("reader", 0.0, []), ("writer", args.writer_hz, [])]),
    ]
    if args.no_lock_demo:
        separate = [f"--arms.{args.arm}.lock_file={work / 'writer-own.lock'}"]
        phases.append((f"reader + writer at {args.writer_hz:g} Hz, NO shared lock",
                       [("reader", 0.0, []), ("writer", args.writer_hz, separate)]))
    rows = []
    try:
        for title, roles in phases:
            before = _emulator_stats(work / "run", args.arm)
            log.info("phase: %s (%g s)", title, args.seconds)
            results = _run_roles(roles, config, args.arm, args.seconds)
            time.sleep(0.7)
            after = _emulator_stats(work / "run", args.arm)
            emulator_bad = after["corrupt_packets"] - before["corrupt_packets"]
            row = {"phase": title, "results": results, "emulator_corrupt_packets": emulator_bad,
                   "emulator_packets": after["packets"] - before["packets"]}
            rows.append(row)
            log.info("%s", json.dumps(row))
    finally:
        emulator.send_signal(signal.SIGTERM)
        emulator.wait(timeout=10)
    return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    cpu = cpu_model()
    lines = [
        "# Servo bus benchmark (emulated SO-101 bus)",
        "",
        f"`python -m bench.bus_rate --seconds {args.seconds:g} --writer-hz {args.writer_hz:g}"
        f"{' --no-lock-demo' if args.no_lock_demo else ''}` on {platform.node()} ({cpu}, {os.cpu_count()} CPUs, "
        f"shared with other work), {time.strftime('%Y-%m-%d')}.",
        "",
        "Reader: back-to-back `ArmBus.read_positions()` (one LeRobot sync read of the six servos under the bus "
        "lock). Writer: `ArmBus.write_goals()` at a fixed rate (sync write). Both are separate processes on one "
        "pseudo-terminal served by `nodes.servo_emulator`.",
        "",
        "| phase | reads/s | read p50 ms | read p99 ms | writes/s | client corrupt | client timeouts | "
        "emulator malformed packets |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        reader = next(r for r in row["results"] if r["role"] == "reader")
        writer = next((r for r in row["results"] if r["role"] == "writer"), None)
        corrupt = sum(r["corrupt"] for r in row["results"])
        timeouts = sum(r["timeouts"] for r in row["results"])
        writes = f"{writer['writes_per_s']:.1f}" if writer else "-"
        lines.append(f"| {row['phase']} | {reader['reads_per_s']:.0f} | {reader['latency_p50_ms']:.2f} | "
                     f"{reader['latency_p99_ms']:.2f} | {writes} | {corrupt} | {timeouts} | "
                     f"{row['emulator_corrupt_packets']} |")
    lines += ["", "The state-reader node reads at `arms.<arm>.read_hz` (60 Hz by default), far below the bus's "
              "capacity; the actuator writes once per tick (30 Hz)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "lift.yaml"))
    parser.add_argument("--arm", default="main")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--writer-hz", type=float, default=30.0)
    parser.add_argument("--no-lock-demo", action="store_true")
    parser.add_argument("--markdown", default="", help="write the result table to this file")
    parser.add_argument("--role", choices=("reader", "writer"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hz", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=os.environ.get("ARMPIPE_LOG_LEVEL", "WARNING" if args.role else "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.role == "reader":
        print(json.dumps(run_reader(args.config, args.arm, args.seconds, args.hz, args.start_at, overrides)))
        return 0
    if args.role == "writer":
        print(json.dumps(run_writer(args.config, args.arm, args.seconds, args.hz or args.writer_hz, args.start_at,
                                    overrides)))
        return 0
    rows = orchestrate(args)
    table = markdown(rows, args)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
