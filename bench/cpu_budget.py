"""The robot computer's CPU budget: the robot side of sort for a few minutes, with the recorder on.

    .venv/bin/python -m bench.cpu_budget [--seconds 180] [--encoding raw|jpeg] [--out bench-cpu.json]

Runs the ``robot-sim`` role of the sort task under the real supervisord (3 synthetic 480x640 cameras at
30 fps, 2 emulated SO-101 arms with their state readers, the actuator writing to the emulated buses, the
recorder and the monitor), with no policy on this host: a stand-in for the GPU server answers in this
process (the contract of the config; each chunk holds the observed state, after 30 ms). One episode is
started over the control socket, runs ``--seconds``, and is stopped; then the recorded episode is checked
against the ticks the actuator published.

Printed (and written with ``--out``): CPU per program in cores over the episode (from /proc), the load
average, the actuator's missed ticks and loop lateness p50/p99, the recorder's dropped ticks, frames
against ticks, the most ticks that waited for its writer, and the time from the stop to the saved episode.
The servo emulators stand in for hardware and the policy stand-in for the network; they are listed but
are not part of the robot computer's budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import StandInServer, Supervised, free_port, write_config
from common.config import DeploymentConfig
from common.wire.contract import STATE_KEY, PolicyContract
from common.wire.protocol import KIND_ACTION, KIND_EVENT, KIND_REPLY, KIND_REQUEST, Message
from common.wire.transport import LatestSubscriber, RequestClient, SocketFactory

log = logging.getLogger("bench.cpu_budget")
HARDWARE_STAND_INS = ("servo_emulator-left", "servo_emulator-right")
CHUNK_ROWS = 30
POLICY_DELAY_S = 0.03


class RemotePolicyStandIn(StandInServer):
    """Answers the actuator as a GPU server would: the config's contract; chunks that hold the observed state."""

    def __init__(self, config: DeploymentConfig) -> None:
        super().__init__(SocketFactory(), config.policy.bind.replace("*", "127.0.0.1"), poll_s=0.1,
                         name="policy-stand-in")
        self.contract = PolicyContract(
            policy_type="stand-in", cameras=config.image_shapes(), state_names=config.state_names(),
            action_names=config.action_names(), chunk_length=CHUNK_ROWS, n_obs_steps=1, fps=config.fps,
            checkpoint_id="bench-stand-in")
        self.requests = 0

    def answer(self, request: Message) -> Message:
        op = request.meta.get("op")
        meta: dict[str, Any] = {"op": op}
        arrays: dict[str, np.ndarray] = {}
        if op == "metadata":
            meta["contract"] = self.contract.to_meta()
        elif op == "infer":
            self.requests += 1
            time.sleep(POLICY_DELAY_S)
            state = np.asarray(request.arrays[STATE_KEY], dtype=np.float32)
            arrays["action"] = np.repeat(state[None, :], CHUNK_ROWS, axis=0)
            meta.update(obs_t=request.meta["obs_t"], timings={"total_s": POLICY_DELAY_S})
        return Message(kind=KIND_REPLY, seq=request.seq, meta=meta, arrays=arrays)


class Tap(threading.Thread):
    """The actuator's executed ticks and loop_stats events."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(name="tap", daemon=True)
        self.endpoint = endpoint
        self.ticks: list[Message] = []
        self.loop_stats: list[Message] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def run(self) -> None:
        subscriber = LatestSubscriber(SocketFactory(), [self.endpoint], hwm=100000)
        while not self.stop.is_set():
            for msg in subscriber.poll(0.1):
                with self.lock:
                    if msg.kind == KIND_ACTION and msg.meta.get("role") == "executed":
                        self.ticks.append(msg)
                    elif msg.kind == KIND_EVENT and msg.meta.get("event") == "loop_stats":
                        self.loop_stats.append(msg)
        subscriber.close()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, seconds (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def control(config: DeploymentConfig, op: str) -> Message:
    client = RequestClient(SocketFactory(), config.actuator.control_endpoint, timeout_s=5.0, retries=2)
    try:
        return client.request(Message(kind=KIND_REQUEST, meta={"op": op, "client": "bench"}))
    finally:
        client.close()


def run(seconds: float, encoding: str, work: Path) -> dict[str, Any]:
    port = free_port()
    cameras = {name: {"encoding": encoding} for name in ("front", "left_wrist", "right_wrist")}
    config_path = write_config(work, "sort", {"cameras": cameras,
                                              "monitor": {"supervisor_url": f"http://127.0.0.1:{port}/RPC2"}})
    stack = Supervised("robot-sim", "sort", config_path, work / "run", port)
    config = stack.config
    policy = RemotePolicyStandIn(config)
    policy.start()
    tap = Tap(config.actuator.events_endpoint)
    tap.start()
    stack.start()
    try:
        stack.wait_all_ready(timeout_s=300)
        time.sleep(3.0)  # let start-up work (imports, first frames) settle before measuring
        pids = {status.name: status.pid for status in stack.processes()}
        load_before = os.getloadavg()
        control(config, "start")
        started = time.monotonic()
        cpu_start = {name: cpu_seconds(pid) for name, pid in pids.items()}
        bench_start = time.process_time()
        missed_start = _missed(tap)
        time.sleep(seconds)
        cpu_end = {name: cpu_seconds(pid) for name, pid in pids.items()}
        bench_cpu = time.process_time() - bench_start
        elapsed = time.monotonic() - started
        load_after = os.getloadavg()
        missed = _missed(tap) - missed_start
        control(config, "stop")
        stopped = time.monotonic()
        metrics_path = Path(config.recorder.output_dir) / "metrics.jsonl"
        deadline = stopped + 180
        while not metrics_path.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        saved_s = time.monotonic() - stopped
        episode = json.loads(metrics_path.read_text().splitlines()[0]) if metrics_path.exists() else {}
    finally:
        stack.shutdown(timeout_s=90)
        tap.stop.set()
        policy.stop.set()
    with tap.lock:
        ticks = [m for m in tap.ticks if m.meta.get("episode_id")]
    episode_ticks = [m for m in ticks if m.meta.get("episode_id") == episode.get("episode_id")]
    lateness = np.asarray([m.meta["lateness_s"] for m in episode_ticks], dtype=np.float64)
    cores = {name: (cpu_end[name] - cpu_start[name]) / elapsed for name in pids}
    robot = {name: value for name, value in cores.items() if name not in HARDWARE_STAND_INS}
    return {
        "machine": "2-core dev VM, no GPU",
        "seconds": round(elapsed, 1), "encoding": encoding, "cameras": len(config.cameras),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "cores_by_program": {name: round(value, 3) for name, value in sorted(cores.items())},
        "robot_side_cores": round(sum(robot.values()), 3),
        "recorder_cores_per_camera": round(cores.get("recorder", 0.0) / len(config.cameras), 3),
        "policy_stand_in_and_tap_cores": round(bench_cpu / elapsed, 3),
        "actuator_missed_ticks": missed,
        "ticks_in_episode": len(episode_ticks),
        "lateness_ms": {"p50": round(float(np.percentile(lateness, 50)) * 1000, 2),
                        "p99": round(float(np.percentile(lateness, 99)) * 1000, 2),
                        "max": round(float(lateness.max()) * 1000, 2)} if lateness.size else None,
        "recorder": {"frames": episode.get("frames"), "dropped_ticks": episode.get("dropped_ticks"),
                     "dropped_ticks_by_reason": episode.get("dropped_ticks_by_reason"),
                     "episode_ticks": episode.get("episode_ticks"),
                     "writer_backlog_max_ticks": episode.get("writer_backlog_max_ticks"),
                     "stop_to_saved_s": round(saved_s, 1)},
        "policy_requests": policy.requests,
    }


def _missed(tap: Tap) -> int:
    with tap.lock:
        return int(tap.loop_stats[-1].meta.get("missed_ticks", 0)) if tap.loop_stats else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--encoding", choices=("raw", "jpeg"), default="raw")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cpu-budget-") as tmp:
        result = run(args.seconds, args.encoding, Path(tmp))
    text = json.dumps(result, indent=2)
    log.info("result:\n%s", text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
