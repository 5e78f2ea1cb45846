"""Actuator loop timing: lateness of each control tick at the task's fps, with the pipeline running.

    .venv/bin/python -m bench.loop_jitter [--config configs/lift.yaml] [--seconds 30] [--checkpoint DIR]
                                          [--baseline] [--markdown FILE]

Starts the whole robot side as real processes on free ports in a temporary run directory: a servo
emulator and a state-reader per arm, one synthetic camera node per camera, the policy node (a tiny
DiffusionPolicy checkpoint built on the spot unless ``--checkpoint`` is given) and the actuator in
dry-run with ``auto_start``, so it runs an episode: requesting chunks, scheduling rows and publishing.
It then listens to the actuator's ``action`` messages: ``lateness_s`` is how long after its deadline
on the monotonic clock each tick started, and the interval between consecutive ticks shows the jitter.

``--baseline`` first measures the actuator alone (no policy, no sensors: every tick a hold) for the same
time, to separate the loop's own overhead from the load of the pipeline around it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.harness import cpu_model
from common.config import REPO_ROOT, load_config
from common.wire.protocol import KIND_ACTION, Message
from common.wire.transport import LatestSubscriber, SocketFactory

log = logging.getLogger("bench.loop_jitter")


def free_endpoint() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def bench_config(source: Path, run_dir: Path, checkpoint: Path, overrides: dict[str, Any]) -> Path:
    """A copy of ``source`` on free ports, ports/locks/run files under ``run_dir``, actuator in dry-run."""
    raw = yaml.safe_load(source.read_text())
    for cam in raw["cameras"].values():
        cam.update(endpoint=free_endpoint(), backend="synthetic")
    for name, arm in raw["arms"].items():
        arm.update(state_endpoint=free_endpoint(), port=str(run_dir / f"so101_{name}.tty"),
                   lock_file=str(run_dir / f"bus_{name}.lock"))
    policy = free_endpoint()
    raw["policy"].update(bind=policy, endpoint=policy, checkpoint=str(checkpoint))
    raw["actuator"].update(control_endpoint=free_endpoint(), events_endpoint=free_endpoint(), dry_run=True,
                           auto_start=True)
    raw["player"]["gt_endpoint"] = free_endpoint()
    raw["run_dir"] = str(run_dir / "run")
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    path = run_dir / source.name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class Processes:
    """Real node processes, each waited for through its readiness file; all stopped on exit."""

    def __init__(self, config_path: Path, log_dir: Path) -> None:
        self.config_path = config_path
        self.run_dir = Path(yaml.safe_load(config_path.read_text())["run_dir"])
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, module: str, name: str = "", *args: str, timeout_s: float = 180.0) -> None:
        program = f"{module}-{name}" if name else module
        cmd = [sys.executable, "-m", f"nodes.{module}", "--config", str(self.config_path), *args]
        if name:
            cmd += ["--name", name]
        log_file = (self.log_dir / f"{program}.log").open("ab")
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs.append((program, proc))
        ready = self.run_dir / "ready" / f"{program}.json"
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.log_dir / f"{program}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{program} did not become ready:\n{tail}")
            time.sleep(0.05)
        log.info("%s ready", program)

    def stop(self) -> None:
        for _program, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _program, proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


@dataclass
class Measurement:
    name: str
    lateness: list[float] = field(default_factory=list)
    tick_times: list[float] = field(default_factory=list)
    holds: dict[str, int] = field(default_factory=dict)
    acting: int = 0
    round_trips: list[float] = field(default_factory=list)
    dropped_stale: list[int] = field(default_factory=list)
    missed_ticks: int = 0

    def summary(self, fps: int) -> dict[str, Any]:
        lateness = np.asarray(self.lateness) * 1000
        intervals = np.diff(np.asarray(self.tick_times)) * 1000
        ticks = len(self.lateness)
        result: dict[str, Any] = {
            "name": self.name, "ticks": ticks, "fps": fps,
            "lateness_ms": {"p50": float(np.percentile(lateness, 50)), "p99": float(np.percentile(lateness, 99)),
                            "max": float(lateness.max())} if ticks else {},
            "interval_ms": {"mean": float(intervals.mean()), "std": float(intervals.std()),
                            "p1": float(np.percentile(intervals, 1)), "p99": float(np.percentile(intervals, 99))}
            if len(intervals) else {},
            "acting_fraction": self.acting / ticks if ticks else 0.0,
            "holds": self.holds,
            "missed_ticks": self.missed_ticks,
        }
        if self.round_trips:
            trips = np.asarray(self.round_trips) * 1000
            result["chunk_round_trip_ms"] = {"p50": float(np.percentile(trips, 50)),
                                             "p99": float(np.percentile(trips, 99)), "chunks": len(trips)}
            result["dropped_stale_rows_mean"] = float(np.mean(self.dropped_stale))
        return result


def measure(events_endpoint: str, name: str, seconds: float, warmup_s: float) -> Measurement:
    sub = LatestSubscriber(SocketFactory(), [events_endpoint], hwm=100000)
    result = Measurement(name)
    start = time.monotonic()
    stats_first: Message | None = None
    stats_last: Message | None = None
    try:
        while (now := time.monotonic()) < start + warmup_s + seconds:
            for msg in sub.poll(0.1):
                if msg.t < start + warmup_s:
                    continue
                if msg.kind == KIND_ACTION:
                    result.lateness.append(float(msg.meta["lateness_s"]))
                    result.tick_times.append(msg.t)
                    if msg.meta["hold"]:
                        reason = msg.meta["hold_reason"]
                        result.holds[reason] = result.holds.get(reason, 0) + 1
                    else:
                        result.acting += 1
                elif msg.meta.get("event") == "chunk":
                    result.round_trips.append(float(msg.meta["round_trip_s"]))
                    result.dropped_stale.append(int(msg.meta["dropped_stale"]))
                elif msg.meta.get("event") == "loop_stats":
                    stats_first = stats_first or msg
                    stats_last = msg
            del now
    finally:
        sub.close()
    if stats_first is not None and stats_last is not None:
        result.missed_ticks = int(stats_last.meta.get("missed_ticks", 0)) - int(stats_first.meta.get("missed_ticks", 0))
    return result


def machine() -> str:
    load = os.getloadavg()
    return (f"{platform.node()}: {cpu_model()}, {os.cpu_count()} logical CPUs, "
            f"Python {platform.python_version()}, load average {load[0]:.2f} at start")


def markdown(summaries: list[dict[str, Any]], host: str, command: str) -> str:
    lines = [
        "# Actuator loop jitter",
        "",
        f"`python -m bench.loop_jitter {command}`",
        "",
        f"Machine: {host}. Actuator in dry-run; all nodes as real processes on this machine.",
        "",
        "| run | fps | ticks | lateness p50 | lateness p99 | lateness max | tick interval mean ± std | "
        "acting | holds | missed ticks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        late, interval = s["lateness_ms"], s["interval_ms"]
        holds = ", ".join(f"{k} {v}" for k, v in sorted(s["holds"].items())) or "none"
        lines.append(f"| {s['name']} | {s['fps']} | {s['ticks']} | {late['p50']:.3f} ms | {late['p99']:.3f} ms | "
                     f"{late['max']:.2f} ms | {interval['mean']:.2f} ± {interval['std']:.2f} ms | "
                     f"{100 * s['acting_fraction']:.1f}% | {holds} | {s['missed_ticks']} |")
    for s in summaries:
        if "chunk_round_trip_ms" in s:
            trip = s["chunk_round_trip_ms"]
            lines += ["", f"{s['name']}: {trip['chunks']} chunks, policy round trip p50 {trip['p50']:.1f} ms, "
                      f"p99 {trip['p99']:.1f} ms; on average {s['dropped_stale_rows_mean']:.2f} rows per chunk "
                      "were already in the past on arrival and dropped."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/lift.yaml")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds ignored after the episode starts")
    parser.add_argument("--checkpoint", default="", help="pretrained_model dir; default: build a tiny one")
    parser.add_argument("--camera-fps", type=int, default=0, help="override every camera's fps (0: config)")
    parser.add_argument("--baseline", action="store_true", help="also measure the actuator alone first")
    parser.add_argument("--nice", type=int, default=0, help="actuator.nice for the measured actuator(s)")
    parser.add_argument("--policy-steps", type=int, default=2,
                        help="policy.num_inference_steps (diffusion); few steps keep a CPU policy near real time")
    parser.add_argument("--markdown", default="", help="write the result table to this file")
    parser.add_argument("--json", default="", help="write the raw summary to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    source = (REPO_ROOT / args.config) if not Path(args.config).is_absolute() else Path(args.config)
    base = load_config(source)
    host = machine()
    summaries: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="armpipe-jitter-") as tmp:
        work = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else None
        if checkpoint is None:
            from common.tools.checkpoint_maker import build_checkpoint

            log.info("building a tiny diffusion checkpoint for %s", base.task)
            checkpoint = build_checkpoint(base, work / "checkpoint", policy_type="diffusion", size="tiny")
        # A generous policy timeout: on a loaded CPU a reply can take seconds, and the bench measures the
        # loop, not whether the policy counts as unreachable.
        config_path = bench_config(source, work, checkpoint, {
            "policy": {"timeout_s": 10.0, "num_inference_steps": args.policy_steps},
            "actuator": {"nice": args.nice}})
        if args.camera_fps:
            raw = yaml.safe_load(config_path.read_text())
            for cam in raw["cameras"].values():
                cam["fps"] = args.camera_fps
            config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        config = load_config(config_path)
        processes = Processes(config_path, work)
        try:
            if args.baseline:
                nowhere = free_endpoint()  # no policy listens here: the actuator holds every tick
                processes.start("actuator", "", "--actuator.contract_wait_s=0.1", f"--policy.endpoint={nowhere}")
                summaries.append(measure(config.actuator.events_endpoint, "actuator alone (idle, no policy)",
                                         args.seconds, args.warmup).summary(config.fps))
                processes.stop()
            for arm in config.arms:
                processes.start("servo_emulator", arm)
                processes.start("state_reader", arm)
            for camera in config.cameras:
                processes.start("camera", camera)
            processes.start("policy")
            processes.start("actuator")
            summaries.append(measure(config.actuator.events_endpoint, "full pipeline (dry-run, episode running)",
                                     args.seconds, args.warmup).summary(config.fps))
        finally:
            processes.stop()
    for summary in summaries:
        print(json.dumps(summary, indent=2))
    text = markdown(summaries, host, " ".join(argv if argv is not None else sys.argv[1:]))
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": host, "runs": summaries}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
