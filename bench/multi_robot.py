"""Many robots, one policy node: chunks served per second, round trips and missed request slots, batching off
against on, in one run.

    python -m bench.multi_robot --policy-type diffusion --size tiny --device cpu --robots 1,2,4 --duration 10
    python -m bench.multi_robot --device cuda --size default --fast --robots 1,4,8,16 --rate 30   # the GPU table
    python -m bench.multi_robot --checkpoint path/to/pretrained_model --task lift ...            # any checkpoint

For each batching mode (``--batching off,on``: ``policy.max_batch`` 1, then ``--max-batch``) it starts one real
policy node (``python -m nodes.policy``) on ``configs/<task>.yaml`` with the checkpoint, waits for it to be
ready (warm-up included: every CUDA graph bucket is recorded before), then for each robot count N starts N
robot processes. Each robot is its own process with its own ``common.wire.policy_client.PolicyClient`` and
session id and asks for a chunk at ``--rate`` Hz: request slot k is at ``t0 + phase + k / rate``; a robot
whose reply has not come back by a slot misses that slot (it sends at the first slot after the reply: a real
actuator asks for at most one chunk at a time). Robot phases are spread evenly over one period (``--phase
spread``, robots that are not in step) or all equal (``aligned``). Observations are the task's raw frames
(uint8, 480x640 for lift) and state, random but fixed per robot.

Printed: a Markdown table (robots, batching, chunks served/s, round trip p50/p99, request slots missed, mean
batch size the replies report), then where the round trip went (the mean of each stage of the replies' timings:
unpack, check, queue, model, reply, and the rest, the network and the client); the node's log (``--work-dir``)
has its capacity lines, with how busy its model and socket threads were; ``--out`` gets one JSON object per
row. The card or CPU is named in the table's heading (``nvidia-smi`` name, or the CPU model and core count).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import cpu_model, write_config
from common.config import REPO_ROOT, load_config

log = logging.getLogger("bench.multi_robot")

FAST = {"dtype": "bf16", "compile": True, "cuda_graphs": True, "fast_unet": True}  # the GPU fast options
DDIM10 = {"noise_scheduler": "DDIM", "num_inference_steps": 10}


def machine_name(device: str) -> str:
    if device.startswith("cuda"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20, check=True).stdout.strip().splitlines()
            return out[0] if out else "unknown GPU"
        except (OSError, subprocess.SubprocessError):
            return "unknown GPU"
    return f"{cpu_model()}, {os.cpu_count()} cores"


def robot(index: int, endpoint: str, config_path: str, rate: float, start_at: float, measure_from: float,
          end_at: float, phase_s: float, timeout_s: float, results: Any) -> None:
    """One simulated robot (its own process): asks for a chunk each request slot it can, reports its numbers."""
    from common.wire.policy_client import PolicyClient
    from common.wire.transport import RemoteError, SocketFactory

    config = load_config(config_path)
    rng = np.random.default_rng(index)
    images = {name: rng.integers(0, 256, (cam.height, cam.width, 3), dtype=np.uint8)
              for name, cam in config.cameras.items()}
    lower, upper = np.array(config.lower_limits()), np.array(config.upper_limits())
    state = rng.uniform(lower, upper).astype(np.float32)
    client = PolicyClient(SocketFactory(), endpoint, client_id=f"robot-{index}", timeout_s=timeout_s, retries=1)
    report: dict[str, Any] = {"round_trips": [], "slots": 0, "missed": 0, "errors": 0, "batches": [], "stages": []}
    period = 1.0 / rate
    first = start_at + phase_s
    try:
        client.reset()
        slot = 0
        used = 0  # measured slots a request went out at
        while (slot_t := first + slot * period) < end_at:
            delay = slot_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            measured = slot_t >= measure_from
            used += measured
            try:
                reply = client.infer(images, state, obs_t=time.monotonic())
                if measured:
                    report["round_trips"].append(reply.round_trip_s)
                    report["batches"].append(reply.batch)
                    report["stages"].append(stage_split(reply.timings, reply.round_trip_s))
            except (RemoteError, TimeoutError, OSError) as exc:
                report["errors"] += measured
                log.debug("robot %d: %s", index, exc)
            # The next slot this robot can use: the first one not already past (the ones between are missed).
            slot = max(slot + 1, int(np.ceil((time.monotonic() - first) / period)))
        in_window = range(int(np.ceil((measure_from - first) / period)), int(np.ceil((end_at - first) / period)))
        report["slots"] = len(in_window)
        report["missed"] = len(in_window) - used
    finally:
        client.close()
        results.put((index, report))


# Where a round trip goes (docs/protocol.md section 8's timings): the stages tile the round trip.
STAGES = ("unpack", "check", "queue", "model", "reply", "network")


def stage_split(timings: dict[str, float], round_trip_s: float) -> list[float]:
    """One reply's round trip split into ``STAGES``, seconds: the server's unpack, its check and input load
    (``decode_s``), the wait for a batch (``queue_s``), the batch's model work (pre-processing, inference,
    post-processing), the rest of the server's time (building the reply: ``server_s - unpack_s - total_s``), and
    what is left (``round trip - server_s``: the wire both ways, the reply's one encode as it is sent, the client's
    encode and decode, the server's socket thread being busy with others)."""
    get = timings.get
    model = get("preprocess_s", 0.0) + get("inference_s", 0.0) + get("postprocess_s", 0.0)
    reply = get("server_s", 0.0) - get("unpack_s", 0.0) - get("total_s", 0.0)
    return [get("unpack_s", 0.0), get("decode_s", 0.0), get("queue_s", 0.0), model, reply,
            round_trip_s - get("server_s", 0.0)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_robots(count: int, endpoint: str, config_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_at = time.monotonic() + args.start_s + 0.2 * count  # spawned interpreters take a moment each
    measure_from = start_at + args.settle_s
    # A row's p99 needs replies enough to mean something: a row of few robots runs longer (--min-replies).
    duration = max(args.duration, args.min_replies / (count * args.rate))
    end_at = measure_from + duration
    processes = []
    for index in range(count):
        phase = (index / count) / args.rate if args.phase == "spread" else 0.0
        process = context.Process(target=robot, args=(index, endpoint, str(config_path), args.rate, start_at,
                                                      measure_from, end_at, phase, args.timeout_s, results))
        process.start()
        processes.append(process)
    reports = [results.get(timeout=end_at - time.monotonic() + 120)[1] for _ in processes]
    for process in processes:
        process.join(timeout=30)
    round_trips = [t for report in reports for t in report["round_trips"]]
    slots = sum(report["slots"] for report in reports)
    missed = sum(report["missed"] for report in reports)
    batches = [b for report in reports for b in report["batches"]]
    stages = np.array([split for report in reports for split in report["stages"]]).reshape(-1, len(STAGES))
    split = {f"{name}_ms": float(stages[:, index].mean() * 1000) if len(stages) else float("nan")
             for index, name in enumerate(STAGES)}
    return {"robots": count, "duration_s": duration, "chunks_per_s": len(round_trips) / duration,
            "round_trip_p50_ms": percentile(round_trips, 50) * 1000,
            "round_trip_p99_ms": percentile(round_trips, 99) * 1000,
            "slots": slots, "missed": missed, "missed_pct": 100.0 * missed / slots if slots else float("nan"),
            "errors": sum(report["errors"] for report in reports),
            "batch_mean": float(np.mean(batches)) if batches else float("nan"), **split}


class PolicyNode:
    """``python -m nodes.policy`` on a config, as a process; ready when its readiness file says serving."""

    def __init__(self, config_path: Path, log_path: Path, overrides: list[str]) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.overrides = overrides
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PolicyNode:
        config = load_config(self.config_path)
        ready = config.resolve(config.run_dir) / "ready" / "policy.json"
        ready.unlink(missing_ok=True)
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "nodes.policy", "--config", str(self.config_path),
                                          *self.overrides], cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if ready.exists() and json.loads(ready.read_text() or "{}").get("serving"):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"policy node exited with {self.proc.returncode}; see {self.log_path}")
            time.sleep(0.2)
        raise RuntimeError(f"policy node not ready after 900 s; see {self.log_path}")

    def __exit__(self, *_: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def markdown(rows: list[dict[str, Any]], heading: str) -> str:
    lines = [heading, "", "| robots | batching | chunks served / s | round trip p50 | p99 | request slots missed | "
             "mean batch | errors |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['robots']} | {row['batching']} | {row['chunks_per_s']:.0f} | "
                     f"{row['round_trip_p50_ms']:.1f} ms | {row['round_trip_p99_ms']:.1f} ms | "
                     f"{row['missed_pct']:.1f} % | {row['batch_mean']:.1f} | {row['errors']} |")
    lines += ["", "Where the round trip goes (mean ms per reply; `network`: round trip - the server's own time: the "
              "wire, the client, the socket thread busy with others):", "",
              "| robots | batching | " + " | ".join(STAGES) + " |", "|---:|---|" + "---:|" * len(STAGES)]
    for row in rows:
        lines.append(f"| {row['robots']} | {row['batching']} | "
                     + " | ".join(f"{row.get(f'{name}_ms', float('nan')):.1f}" for name in STAGES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="lift")
    parser.add_argument("--checkpoint", default="", help="a pretrained_model directory; default: build one")
    parser.add_argument("--policy-type", default="diffusion", help="for the built checkpoint: diffusion | act")
    parser.add_argument("--size", default="tiny", help="for the built checkpoint: tiny | default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fast", action="store_true", help="the GPU fast options (bf16, compile, graphs, fast UNet)")
    parser.add_argument("--ddim10", action="store_true", help="diffusion: DDIM with 10 steps")
    parser.add_argument("--robots", default="1,4", help="robot counts, comma separated")
    parser.add_argument("--rate", type=float, default=30.0, help="requests per second per robot")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per row")
    parser.add_argument("--min-replies", type=int, default=0,
                        help="a row runs until this many requests are due at least (a 1-robot row's p99 from 150 "
                             "replies is its second-largest one; 600 make it steadier)")
    parser.add_argument("--settle-s", type=float, default=2.0, help="unmeasured seconds before each row")
    parser.add_argument("--start-s", type=float, default=3.0)
    parser.add_argument("--phase", choices=("spread", "aligned"), default="spread")
    parser.add_argument("--batching", default="off,on", help="off (policy.max_batch 1) and/or on")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--window-ms", type=float, default=0.0, help="policy.batch_window_ms when batching is on")
    parser.add_argument("--cpu-threads", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=5.0, help="a robot's reply timeout")
    parser.add_argument("--out", default="", help="JSON lines, one per row")
    parser.add_argument("--markdown", default="", help="write the table here too")
    parser.add_argument("--work-dir", default="")
    # Anything else (--policy.X=Y) goes to the node's command line, after the fields above.
    args, node_overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="multi-robot-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint
    label = args.policy_type
    if not checkpoint:
        from common.lerobot_guard import guard_lerobot_imports

        guard_lerobot_imports()
        from common.tools.checkpoint_maker import build_checkpoint

        base = load_config(REPO_ROOT / "configs" / f"{args.task}.yaml")
        checkpoint = str(build_checkpoint(base, work / "checkpoint", policy_type=args.policy_type, size=args.size))
        label = f"{args.policy_type} ({args.size}, untrained)"
    policy: dict[str, Any] = {"checkpoint": checkpoint, "device": args.device, "cpu_threads": args.cpu_threads,
                              "warmup": 2, "batch_window_ms": args.window_ms}
    if args.fast:
        policy.update(FAST)
    if args.ddim10:
        policy.update(DDIM10)
    config_path = write_config(work, args.task, {"policy": policy})
    endpoint = load_config(config_path).policy.endpoint
    options = ", ".join([*(f"{key}={value}" for key, value in policy.items() if key not in ("checkpoint",)),
                         *node_overrides])
    heading = (f"### {label} on {machine_name(args.device)}: {args.rate:g} Hz per robot, {args.phase} phases, "
               f"{args.duration:g} s per row, at least {args.min_replies} requests ({options})")
    rows: list[dict[str, Any]] = []
    counts = [int(value) for value in args.robots.split(",") if value]
    for mode in [value.strip() for value in args.batching.split(",") if value.strip()]:
        max_batch = 1 if mode == "off" else args.max_batch
        node_args = [f"--policy.max_batch={max_batch}", *node_overrides]
        with PolicyNode(config_path, work / f"policy-{mode}.log", node_args):
            for count in counts:
                row = {"batching": mode, "max_batch": max_batch, "policy": label, "machine": machine_name(args.device),
                       **run_robots(count, endpoint, config_path, args)}
                rows.append(row)
                log.info("RESULT %s", json.dumps(row))
                if args.out:
                    with open(args.out, "a") as out:
                        out.write(json.dumps(row) + "\n")
    table = markdown(sorted(rows, key=lambda row: (row["robots"], row["batching"])), heading)
    sys.stdout.write(table + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
