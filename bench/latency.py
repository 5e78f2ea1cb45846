"""The latency bench: capture -> goal written to the servo bus, stage by stage, against the peers, in one run.

    .venv/bin/python -m bench.latency [--seconds 20] [--policy-type diffusion|act|smolvla|pi0|pi05]
        [--size tiny|default] [--steps 10] [--scheduler DDIM|DDPM] [--device cpu|cuda] [--fast]
        [--variants armpipe-raw,armpipe-jpeg,openpi-ws,lerobot-grpc,openpi-gateway,armpipe-openpi]
        [--out DIR] [--label NAME]

Starts the whole pipeline as real processes on free ports in a temporary directory: a servo emulator
and a state-reader per arm, one synthetic 480x640 camera node per camera, the policy node (a checkpoint
built on the spot unless ``--checkpoint`` is given) and the actuator writing goals to the emulated bus
with ``auto_start``. Every goal that reaches the bus comes with a ``latency`` event (docs/protocol.md):
robot-clock stamps from capture to bus write, and the policy's own durations. Then, on the same cameras,
arm and checkpoint, one after the other:

- ``armpipe-raw`` / ``armpipe-jpeg``: the actuator and policy node, cameras sending raw or JPEG frames.
- ``openpi-ws``: an openpi-style WebSocket server (msgpack over one socket; the same ``PolicyRuntime`` as
  the policy node, so only the architecture differs) and a synchronous client with ``openpi-client``'s
  ``WebsocketClientPolicy``: when its chunk is used up it asks for the next and waits (open-loop chunks
  of the policy's ``chunk_length`` rows), writing each row to the bus at the control rate.
- ``lerobot-grpc``: LeRobot 0.6.1's own async inference server (``lerobot.async_inference.policy_server``,
  gRPC + pickle) with a client that follows ``RobotClient``'s loop (observation when the queue is at or
  below half a chunk, actions aggregated by timestep). It cannot serve DiffusionPolicy; the table then
  says so with the server's error, and ``--grpc-act`` runs it with an ACT checkpoint of the same size.
- ``openpi-gateway`` (row "openpi-client through the gateway"): the openpi-ws client, unchanged, talking to
  ``nodes.openpi_gateway`` in front of the policy node (issue 24's first door).
- ``armpipe-openpi`` (row "armpipe robot side on an openpi server"): armpipe's actuator with
  ``policy.backend: openpi`` on the openpi-ws server (the second door): latency compensation, refill and
  safety as armpipe-raw, on openpi's wire. Its server part is openpi's ``infer_ms`` only (decode and encode
  on the server count as network).

Baselines write the same stamps (their server part: what their server reports; LeRobot's reports
nothing, so its round trip counts as network). Output under ``--out``: ``latency.json`` (every record
and the summary), ``latency.md`` (the tables), ``latency.png`` (stacked stage bars, end-to-end
distributions).

End to end is measured per goal written: ``written_t - capture_t`` of the observation behind that goal
(what the arm is acting on, and how old it is), and separately for the first goal each observation
produced (``first``: the reaction time to a new frame).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import pickle  # nosec: the LeRobot gRPC baseline speaks pickle; only its own server's bytes are unpickled
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.loop_jitter import Processes, free_endpoint, machine
from common.config import REPO_ROOT, DeploymentConfig, load_config
from common.streams import sensor_endpoints
from common.wire.latency import STAGE_NAMES, STAGES, LatencyError, stages
from common.wire.protocol import KIND_EVENT, KIND_FRAME, KIND_REQUEST, KIND_STATE, Message
from common.wire.transport import LatestSubscriber, SocketFactory

log = logging.getLogger("bench.latency")

VARIANTS = ("armpipe-raw", "armpipe-jpeg", "openpi-ws", "lerobot-grpc", "openpi-gateway", "armpipe-openpi")
# SmolVLA / pi0 / pi0.5: the actuator sends the task's instruction; the peers' clients here send none.
LANGUAGE_POLICIES = ("smolvla", "pi0", "pi05")
LANGUAGE_VARIANTS = ("armpipe-raw", "armpipe-jpeg")
# Issue 24's two doors, by the names their rows carry.
GATEWAY_ROW = "openpi-client through the gateway"
ROBOT_ON_OPENPI_ROW = "armpipe robot side on an openpi server"
BASELINE_TIMEOUT_S = 60.0


# ==================================================================================================
# Configuration
# ==================================================================================================


def bench_config(source: Path, work: Path, checkpoint: Path, args: argparse.Namespace, *, jpeg: bool) -> Path:
    """``source`` on free ports under ``work``: synthetic cameras, actuator writing to the emulated bus."""
    raw = yaml.safe_load(source.read_text())
    for cam in raw["cameras"].values():
        cam.update(endpoint=free_endpoint(), backend="synthetic", encoding="jpeg" if jpeg else "raw")
    for name, arm in raw["arms"].items():
        arm.update(state_endpoint=free_endpoint(), port=str(work / f"so101_{name}.tty"),
                   lock_file=str(work / f"bus_{name}.lock"))
    policy = free_endpoint()
    raw["policy"].update(bind=policy, endpoint=policy, checkpoint=str(checkpoint), device=args.device,
                         timeout_s=args.policy_timeout, num_inference_steps=args.steps,
                         noise_scheduler=args.scheduler, warmup=args.warmup_passes)
    if args.fast:  # a VLA's fast path is bf16 + CUDA graphs (nodes/policy/vla_fast.py): compile is refused for it
        raw["policy"].update(dtype="bf16", compile=args.policy_type not in LANGUAGE_POLICIES, cuda_graphs=True,
                             fast_unet=args.policy_type == "diffusion")
    if args.device == "cpu":
        raw["policy"]["cpu_threads"] = args.cpu_threads
    # A request at every tick: the queue is refilled from the newest observation as soon as the previous
    # reply is in (refill_rows = the whole chunk); replace keeps only the newest chunk's rows.
    raw["actuator"].update(control_endpoint=free_endpoint(), events_endpoint=free_endpoint(), dry_run=False,
                           auto_start=True, refill_rows=args.refill_rows, overlap=args.overlap,
                           max_chunk_age_s=max(2.0, args.policy_timeout))
    raw["player"]["gt_endpoint"] = free_endpoint()
    # openpi's doors (issue 24): the keys the openpi-style client and server of this bench use.
    from bench.harness import free_port

    keys = {"images": {f"observation.images.{name}": name for name in raw["cameras"]}, "state": ["observation.state"]}
    raw["openpi"] = {"gateway": {"port": free_port(), "layouts": ["flat"], "flat": keys,
                                 "timeout_s": args.policy_timeout},
                     "server": {"layout": "flat", "keys": keys}}
    raw["run_dir"] = str(work / "run")
    path = work / f"{'jpeg' if jpeg else 'raw'}-{source.name}"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def same_endpoints(config_path: Path, other: Path) -> Path:
    """``other`` with ``config_path``'s endpoints, ports and policy (so both variants share the processes
    that do not change), keeping ``other``'s camera encoding."""
    base = yaml.safe_load(config_path.read_text())
    raw = yaml.safe_load(other.read_text())
    for name, cam in raw["cameras"].items():
        cam["endpoint"] = base["cameras"][name]["endpoint"]
    raw["arms"] = base["arms"]
    raw["policy"] = base["policy"]
    raw["actuator"] = base["actuator"]
    raw["player"] = base["player"]
    other.write_text(yaml.safe_dump(raw, sort_keys=False))
    return other


# ==================================================================================================
# Records
# ==================================================================================================


@dataclass
class Record:
    """One goal written to the bus: robot-clock stamps and the server's durations."""

    stamps: dict[str, float]
    server: dict[str, float]
    row: int = 0
    first_row: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"stamps": self.stamps, "server": self.server, "row": self.row, "first_row": self.first_row}


@dataclass
class VariantResult:
    name: str
    records: list[Record] = field(default_factory=list)
    error: str = ""
    note: str = ""
    chunks: int = 0
    holds: dict[str, int] = field(default_factory=dict)
    ticks: int = 0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "error": self.error, "note": self.note, "goals": len(self.records),
                               "chunks": self.chunks, "ticks": self.ticks, "holds": self.holds}
        if not self.records:
            return out
        per_stage = {name: [] for name in STAGE_NAMES}
        e2e, first = [], []
        for record in self.records:
            try:
                durations = stages(record.stamps, record.server)
            except LatencyError as exc:
                log.warning("%s: record skipped: %s", self.name, exc)
                continue
            for name, value in durations.items():
                per_stage[name].append(value)
            total = record.stamps["written_t"] - record.stamps["capture_t"]
            e2e.append(total)
            if record.first_row:
                first.append(total)
        out["stages_ms"] = {name: percentiles(values) for name, values in per_stage.items()}
        out["end_to_end_ms"] = percentiles(e2e)
        out["first_goal_ms"] = percentiles(first)
        out["end_to_end_samples_ms"] = [round(v * 1000, 3) for v in e2e]
        out["first_goal_samples_ms"] = [round(v * 1000, 3) for v in first]
        return out


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    data = np.asarray(values) * 1000
    return {"p50": float(np.percentile(data, 50)), "p99": float(np.percentile(data, 99)), "max": float(data.max()),
            "mean": float(data.mean()), "n": len(values)}


def collect_armpipe(events_endpoint: str, name: str, seconds: float, warmup_s: float) -> VariantResult:
    """``latency`` events of the actuator for ``seconds`` after ``warmup_s`` of acting."""
    result = VariantResult(name)
    sub = LatestSubscriber(SocketFactory(), [events_endpoint], hwm=100000)
    started: float | None = None
    deadline = time.monotonic() + warmup_s + seconds + BASELINE_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            for msg in sub.poll(0.1):
                if msg.kind == KIND_EVENT and msg.meta.get("event") == "latency":
                    if started is None:
                        started = time.monotonic()
                        deadline = started + warmup_s + seconds
                    if time.monotonic() < started + warmup_s:
                        continue
                    result.records.append(Record(stamps=dict(msg.meta["stamps"]), server=dict(msg.meta["server"]),
                                                 row=int(msg.meta["row"]), first_row=bool(msg.meta["first_row"])))
                elif started is not None and time.monotonic() >= started + warmup_s:
                    if msg.kind == KIND_EVENT and msg.meta.get("event") == "chunk":
                        result.chunks += 1
                    elif msg.meta.get("role") == "executed":
                        result.ticks += 1
                        if msg.meta.get("hold"):
                            reason = str(msg.meta.get("hold_reason"))
                            result.holds[reason] = result.holds.get(reason, 0) + 1
    finally:
        sub.close()
    if started is None:
        result.error = f"no goal reached the bus within {warmup_s + seconds + BASELINE_TIMEOUT_S:.0f} s"
    return result


# ==================================================================================================
# Baseline clients: shared parts (sensors in, goals out)
# ==================================================================================================


class Sensors:
    """The newest frame per camera and state per arm, with the robot-clock time each was received."""

    def __init__(self, config: DeploymentConfig) -> None:
        self.config = config
        self.sub = LatestSubscriber(SocketFactory(), sensor_endpoints(config))
        self.parts: dict[str, tuple[Message, float]] = {}

    def drain(self) -> None:
        for msg in self.sub.poll(0.0):
            now = time.monotonic()
            if msg.kind == KIND_FRAME:
                self.parts[f"camera:{msg.meta['camera']}"] = (msg, now)
            elif msg.kind == KIND_STATE:
                self.parts[f"arm:{msg.meta['arm']}"] = (msg, now)

    def complete(self) -> bool:
        return len(self.parts) == len(self.config.cameras) + len(self.config.arms)

    def observation(self) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, float]]:
        """Images, state and the oldest part's stamps (capture, published, received)."""
        images = {name: self.parts[f"camera:{name}"][0].arrays["image"] for name in self.config.cameras}
        state = np.concatenate([self.parts[f"arm:{name}"][0].arrays["position"] for name in self.config.arms])
        oldest, received = min(self.parts.values(), key=lambda item: item[0].t)
        stamps = {"capture_t": oldest.t, "published_t": float(oldest.meta.get("pub_t", oldest.t)),
                  "received_t": received}
        return images, state.astype(np.float32), stamps

    def close(self) -> None:
        self.sub.close()


class BusOut:
    """Goal writes to every arm's (emulated) bus, clipped to the joint limits the driver accepts."""

    def __init__(self, config: DeploymentConfig) -> None:
        from common.feetech_bus import ArmBus

        self.buses = [ArmBus(arm, name=name) for name, arm in config.arms.items()]
        for bus in self.buses:
            bus.connect()
        self.failures = 0
        self.lower = np.asarray(config.lower_limits(), dtype=np.float32)
        self.upper = np.asarray(config.upper_limits(), dtype=np.float32)

    def write(self, target: np.ndarray) -> bool:
        """True when every arm took the goal; a failed transaction (a busy machine: late status packets) is
        logged and that goal gets no record, as the actuator's bus writer does."""
        target = np.clip(np.asarray(target, dtype=np.float32), self.lower, self.upper)
        try:
            for index, bus in enumerate(self.buses):
                bus.write_goals(target[index * 6:(index + 1) * 6])
        except Exception as exc:
            self.failures += 1
            log.warning("goal write failed (%d so far): %s", self.failures, exc)
            return False
        return True

    def close(self) -> None:
        for bus in self.buses:
            bus.disconnect()


def wait_complete(sensors: Sensors, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not sensors.complete():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no frames/states from every sensor in {timeout_s:.0f} s: have {sorted(sensors.parts)}")
        sensors.drain()
        time.sleep(0.01)


def write_records(path: Path, records: list[Record], extra: dict[str, Any]) -> None:
    path.write_text(json.dumps({"records": [r.to_json() for r in records], **extra}))


# ==================================================================================================
# openpi-style WebSocket baseline
# ==================================================================================================


def serve_openpi(config_path: Path, port: int, ready_file: Path) -> None:
    """openpi's ``WebsocketPolicyServer`` shape: metadata on connect, then msgpack in / msgpack out, one
    request at a time, with the policy node's runtime behind it."""
    import websockets.asyncio.server
    from openpi_client import msgpack_numpy as openpi_msgpack

    from nodes.policy.runtime import PolicyRuntime

    config = load_config(config_path)
    runtime = PolicyRuntime(config)
    runtime.warmup(config.policy.warmup)
    packer = openpi_msgpack.Packer()

    async def handler(websocket: Any) -> None:
        await websocket.send(packer.pack({"server": "openpi-style", "chunk_length": runtime.contract.chunk_length,
                                          "action_horizon": runtime.contract.chunk_length}))
        async for message in websocket:
            received = time.perf_counter()
            obs = openpi_msgpack.unpackb(message)
            unpacked = time.perf_counter()
            request = Message(kind=KIND_REQUEST, meta={"op": "infer", "client": "openpi", "obs_t": 0.0},
                              arrays={k: v for k, v in obs.items() if isinstance(v, np.ndarray)})
            result = runtime.infer("openpi", request)
            # server_s ends as the reply goes to its one pack, as in the policy node (a header cannot time its
            # own encode: that falls in the client's network stage).
            timings = {**result.timings, "unpack_s": unpacked - received, "server_s": time.perf_counter() - received,
                       "infer_ms": result.timings["total_s"] * 1000}  # openpi's own field
            await websocket.send(packer.pack({"actions": result.actions, "server_timing": timings}))

    async def main() -> None:
        async with websockets.asyncio.server.serve(handler, "127.0.0.1", port, compression=None, max_size=None):
            ready_file.write_text("ready")
            await asyncio.Future()

    asyncio.run(main())


def run_openpi_client(config_path: Path, port: int, seconds: float, warmup_s: float, out: Path) -> None:
    """A synchronous openpi-style robot loop: infer when the chunk is used up, then play it open loop."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    config = load_config(config_path)
    period = 1.0 / config.fps
    sensors = Sensors(config)
    bus = BusOut(config)
    policy = WebsocketClientPolicy(host="127.0.0.1", port=port)
    metadata = policy.get_server_metadata()
    chunk_length = int(metadata.get("chunk_length") or metadata.get("action_horizon") or 0)
    wait_complete(sensors)
    records: list[Record] = []
    queue: list[tuple[int, np.ndarray]] = []
    chain: dict[str, Any] = {}
    start = math.inf  # the clock starts with the first chunk
    chunks = 0
    try:
        while (tick_start := time.monotonic()) < start + warmup_s + seconds:
            if start == math.inf and chunks:
                start = tick_start
            sensors.drain()
            if not queue:
                images, state, stamps = sensors.observation()
                obs = {**{f"observation.images.{k}": v for k, v in images.items()}, "observation.state": state}
                stamps["sent_t"] = time.monotonic()
                reply = policy.infer(obs)
                stamps["replied_t"] = stamps["scheduled_t"] = time.monotonic()
                server = reply["server_timing"]
                if isinstance(reply.get("policy_timing"), dict):
                    # armpipe's openpi gateway: the policy node's own durations; the gateway's hop is network
                    server = {f"{key.removesuffix('_ms')}_s": value / 1000
                              for key, value in reply["policy_timing"].items()}
                chain = {"stamps": stamps, "server": server}
                rows = reply["actions"][: chunk_length or None]
                queue = list(enumerate(rows))
                chunks += 1
            row, target = queue.pop(0)
            executed = time.monotonic()
            ok = bus.write(target)
            written = time.monotonic()
            if ok and tick_start >= start + warmup_s:
                records.append(Record(stamps={**chain["stamps"], "executed_t": executed, "written_t": written},
                                      server=dict(chain["server"]), row=row, first_row=row == 0))
            # openpi's runtime paces with a rate limiter: sleep what is left of the period, if anything.
            remaining = period - (time.monotonic() - tick_start)
            if remaining > 0:
                time.sleep(remaining)
    finally:
        bus.close()
        sensors.close()
    write_records(out, records, {"chunks": chunks, "chunk_length": chunk_length})


# ==================================================================================================
# LeRobot async inference (gRPC) baseline
# ==================================================================================================


def run_grpc_client(config_path: Path, port: int, policy_type: str, checkpoint: Path, device: str, seconds: float,
                    warmup_s: float, out: Path) -> None:
    """``lerobot.async_inference.robot_client.RobotClient``'s loop over our sensors and bus (its Robot
    classes need real cameras): observation when the queue holds at most half a chunk (``must_go`` when it
    is empty), actions received in a thread and aggregated by timestep, one action per tick."""
    import grpc
    import torch  # noqa: F401  (the pickled actions are torch tensors)

    from nodes.policy.checkpoint import guard_lerobot_imports

    guard_lerobot_imports()
    from lerobot.async_inference.helpers import RemotePolicyConfig, TimedObservation
    from lerobot.transport import services_pb2, services_pb2_grpc
    from lerobot.transport.utils import grpc_channel_options, send_bytes_in_chunks
    from lerobot.utils.feature_utils import hw_to_dataset_features

    config = load_config(config_path)
    period = 1.0 / config.fps
    names = config.action_names()
    hardware = {name: float for name in names}
    hardware.update({cam: (c.height, c.width, 3) for cam, c in config.cameras.items()})
    features = hw_to_dataset_features(hardware, "observation", use_video=False)
    chunk_length = int(json.loads((checkpoint / "config.json").read_text()).get("n_action_steps", 1))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", grpc_channel_options(initial_backoff=f"{period:.4f}s"))
    stub = services_pb2_grpc.AsyncInferenceStub(channel)
    stub.Ready(services_pb2.Empty())
    stub.SendPolicyInstructions(services_pb2.PolicySetup(data=pickle.dumps(RemotePolicyConfig(
        policy_type, str(checkpoint), features, chunk_length, device))))
    sensors = Sensors(config)
    bus = BusOut(config)
    wait_complete(sensors)
    lock = threading.Lock()
    sent: dict[int, dict[str, float]] = {}  # observation timestep -> its stamps
    queue: dict[int, tuple[np.ndarray, dict[str, Any], int]] = {}  # timestep -> (action, chain, row)
    latest = -1
    chunk_size = -1
    must_go = True
    stop = threading.Event()
    errors: list[str] = []
    chunks = 0

    def receive() -> None:
        nonlocal chunk_size, must_go, chunks
        while not stop.is_set():
            try:
                reply = stub.GetActions(services_pb2.Empty())  # as RobotClient: no deadline
            except grpc.RpcError as exc:
                if not stop.is_set():
                    errors.append(f"GetActions: {exc.code()}: {exc.details()}")
                continue
            if not reply.data:
                continue
            replied = time.monotonic()
            actions = pickle.loads(reply.data)  # nosec: our own LeRobot server's reply
            first = actions[0].get_timestep()
            with lock:
                stamps = sent.get(first)
                if stamps is None:
                    continue
                chain = {"stamps": {**stamps, "replied_t": replied, "scheduled_t": time.monotonic()},
                         "server": {k: 0.0 for k in ("unpack_s", "decode_s", "preprocess_s", "inference_s",
                                                     "postprocess_s", "total_s", "server_s")}}
                chunk_size = max(chunk_size, len(actions))
                for row, action in enumerate(actions):
                    step = action.get_timestep()
                    if step > latest:
                        queue[step] = (action.get_action().numpy(), chain, row)
                chunks += 1
                must_go = True

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    records: list[Record] = []
    start = math.inf  # the clock starts with the first chunk (the server's first inference can take seconds)
    give_up = time.monotonic() + BASELINE_TIMEOUT_S * 3
    first_seen: set[int] = set()
    try:
        while (tick_start := time.monotonic()) < min(start + warmup_s + seconds, give_up):
            if start == math.inf and chunks:
                start = tick_start
            sensors.drain()
            with lock:
                step = min(queue) if queue else None
                item = queue.pop(step) if step is not None else None
            if item is not None:
                target, chain, row = item
                executed = time.monotonic()
                ok = bus.write(target)
                written = time.monotonic()
                latest = step
                key = id(chain)
                if ok and tick_start >= start + warmup_s:
                    records.append(Record(stamps={**chain["stamps"], "executed_t": executed, "written_t": written},
                                          server=dict(chain["server"]), row=row, first_row=key not in first_seen))
                first_seen.add(key)
            with lock:
                ready = len(queue) / chunk_size <= 0.5 if chunk_size > 0 else True
                go = must_go and not queue
            if ready:
                images, state, stamps = sensors.observation()
                raw: dict[str, Any] = {name: float(value) for name, value in zip(names, state, strict=True)}
                raw.update(images)
                raw["task"] = ""
                timestep = max(latest, 0)
                observation = TimedObservation(timestamp=time.time(), observation=raw, timestep=timestep, must_go=go)
                stamps["sent_t"] = time.monotonic()
                with lock:
                    sent[timestep] = stamps
                stub.SendObservations(send_bytes_in_chunks(pickle.dumps(observation), services_pb2.Observation))
                if go:
                    with lock:
                        must_go = False
            remaining = period - (time.monotonic() - tick_start)
            if remaining > 0:
                time.sleep(remaining)
    finally:
        stop.set()
        channel.close()  # cancels a GetActions still waiting
        receiver.join(timeout=6)
        bus.close()
        sensors.close()
    write_records(out, records, {"chunks": chunks, "errors": errors[-3:]})


# ==================================================================================================
# Orchestration
# ==================================================================================================


def child(args: list[str], log_file: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "bench.latency", *args], cwd=REPO_ROOT,
                            stdout=log_file.open("ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_file(path: Path, proc: subprocess.Popen[bytes], timeout_s: float, log_file: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path.name} never appeared:\n{log_file.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)


def stop_child(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_client(args_list: list[str], out: Path, work: Path, name: str, timeout_s: float,
               failed: Any = None) -> VariantResult:
    """Run a baseline client to its end; ``failed()`` (a reason, or "") stops it early once its server
    has shown that it cannot serve."""
    log_file = work / f"{name}-client.log"
    out.unlink(missing_ok=True)  # a reused --work directory must not hand back an earlier run's records
    proc = child(args_list, log_file)
    deadline = time.monotonic() + timeout_s
    reason = ""
    while proc.poll() is None and time.monotonic() < deadline:
        reason = failed() if failed is not None else ""
        if reason:
            time.sleep(3.0)  # let it write what it has
            break
        time.sleep(0.5)
    stop_child(proc)
    if reason:
        return VariantResult(name, error=reason)
    result = VariantResult(name)
    if not out.exists():
        result.error = f"client failed: {log_file.read_text(errors='replace')[-600:].strip()}"
        return result
    data = json.loads(out.read_text())
    result.records = [Record(**r) for r in data["records"]]
    result.chunks = int(data.get("chunks", 0))
    result.ticks = len(result.records)
    if data.get("errors"):
        result.note = "; ".join(data["errors"])
    return result


GRPC_FAILURE = "LeRobot policy server inference failed:"


def serve_grpc(argv: list[str]) -> None:
    """LeRobot's own ``policy_server`` (its draccus CLI), unchanged except that an inference failure is
    also logged with its exception: the server logs only ``str(exc)``, which is empty for a KeyError."""
    from nodes.policy.checkpoint import guard_lerobot_imports

    guard_lerobot_imports()  # an out-of-range transformers (the GPU machine's) must not break lerobot's import
    from lerobot.async_inference import policy_server

    predict = policy_server.PolicyServer._predict_action_chunk

    def logged(self: Any, observation: Any) -> Any:
        try:
            return predict(self, observation)
        except Exception as exc:
            log.error("%s %s: %r", GRPC_FAILURE, type(exc).__name__, exc)
            raise

    policy_server.PolicyServer._predict_action_chunk = logged
    sys.argv = ["policy_server", *argv]
    policy_server.serve()


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def grpc_server_error(log_file: Path) -> str:
    text = log_file.read_text(errors="replace") if log_file.exists() else ""
    for line in text.splitlines():
        if GRPC_FAILURE in line:
            return line.split(GRPC_FAILURE, 1)[1].strip()[:400]
    for line in text.splitlines():
        if "Error in StreamActions" in line or "Traceback" in line:
            return line.strip()[-400:]
    return ""


def run_grpc(name: str, config_path: Path, checkpoint: Path, policy_type: str, args: argparse.Namespace,
             work: Path) -> VariantResult:
    from bench.harness import free_port

    port = free_port()
    log_file = work / f"{name}-server.log"
    server = subprocess.Popen([sys.executable, "-m", "bench.latency", "serve-grpc", "--host=127.0.0.1",
                               f"--port={port}", "--fps=30", "--inference_latency=0", "--obs_queue_timeout=2"],
                              cwd=work, stdout=log_file.open("ab"), stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1",
                                   "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])})
    try:
        deadline = time.monotonic() + 300
        while "PolicyServer started" not in _read(log_file):  # its imports take a minute on a busy CPU
            if server.poll() is not None or time.monotonic() > deadline:
                return VariantResult(name, error=f"LeRobot's policy server did not start: {_read(log_file)[-300:]}")
            time.sleep(0.2)
        out = work / f"{name}.json"
        result = run_client(["grpc-client", "--config", str(config_path), "--port", str(port), "--policy-type",
                             policy_type, "--checkpoint", str(checkpoint), "--device", args.device,
                             "--seconds", str(args.seconds), "--warmup", str(args.warmup), "--out", str(out)],
                            out, work, name, args.seconds + args.warmup + 240,
                            failed=lambda: grpc_server_error(log_file) if GRPC_FAILURE in _read(log_file) else "")
        if not result.records:
            result.error = result.error or grpc_server_error(log_file) or "no action chunk came back"
        return result
    finally:
        stop_child(server)


def run_openpi(config_path: Path, args: argparse.Namespace, work: Path) -> VariantResult:
    from bench.harness import free_port

    port = free_port()
    ready = work / "openpi.ready"
    ready.unlink(missing_ok=True)
    log_file = work / "openpi-server.log"
    server = child(["serve-openpi", "--config", str(config_path), "--port", str(port), "--ready", str(ready)],
                   log_file)
    try:
        wait_file(ready, server, 600, log_file)
        out = work / "openpi.json"
        return run_client(["openpi-client", "--config", str(config_path), "--port", str(port), "--seconds",
                           str(args.seconds), "--warmup", str(args.warmup), "--out", str(out)], out, work,
                          "openpi-ws", args.seconds + args.warmup + 120)
    finally:
        stop_child(server)


def run_gateway(config_path: Path, processes: Processes, args: argparse.Namespace, work: Path) -> VariantResult:
    """openpi-client's loop (as openpi-ws) through nodes.openpi_gateway to the policy node."""
    config = load_config(config_path)
    processes.start("openpi_gateway")
    try:
        out = work / "openpi-gateway.json"
        result = run_client(["openpi-client", "--config", str(config_path), "--port",
                             str(config.openpi.gateway.port), "--seconds", str(args.seconds), "--warmup",
                             str(args.warmup), "--out", str(out)], out, work, GATEWAY_ROW,
                            args.seconds + args.warmup + 120)
    finally:
        stop_named(processes, "openpi_gateway")
    # The gateway's own durations are not in the client's chain: the policy node's timings are under
    # policy_timing, and server_timing.infer_ms is the gateway's round trip to the policy node.
    return result


def run_robot_on_openpi(config_path: Path, cameras: Processes, args: argparse.Namespace,
                        work: Path) -> VariantResult:
    """armpipe's actuator (policy.backend: openpi) on the openpi-style server of openpi-ws."""
    from bench.harness import free_port

    port = free_port()
    ready = work / "openpi-backend.ready"
    ready.unlink(missing_ok=True)
    log_file = work / "openpi-backend-server.log"
    server = child(["serve-openpi", "--config", str(config_path), "--port", str(port), "--ready", str(ready)],
                   log_file)
    try:
        wait_file(ready, server, 600, log_file)
        config = load_config(config_path)
        cameras.start("actuator", "", "--policy.backend=openpi", f"--openpi.server.endpoint=ws://127.0.0.1:{port}")
        try:
            return collect_armpipe(config.actuator.events_endpoint, ROBOT_ON_OPENPI_ROW, args.seconds, args.warmup)
        finally:
            stop_named(cameras, "actuator")
    finally:
        stop_child(server)


def build_checkpoints(base: DeploymentConfig, args: argparse.Namespace, work: Path) -> tuple[Path, Path | None]:
    from common.tools.checkpoint_maker import build_checkpoint

    if args.checkpoint:
        main_ckpt = Path(args.checkpoint)
    else:
        log.info("building a %s %s checkpoint for %s", args.size, args.policy_type, base.task)
        main_ckpt = build_checkpoint(base, work / f"checkpoint-{args.policy_type}", policy_type=args.policy_type,
                                     size=args.size, device=args.device)
    act_ckpt = None
    if "lerobot-grpc" in args.variants and args.policy_type != "act" and args.grpc_act:
        act_ckpt = build_checkpoint(base, work / "checkpoint-act", policy_type="act", size=args.size)
    return main_ckpt, act_ckpt


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    source = (REPO_ROOT / args.config) if not Path(args.config).is_absolute() else Path(args.config)
    base = load_config(source)
    host = machine()
    results: list[VariantResult] = []
    with tempfile.TemporaryDirectory(prefix="armpipe-latency-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(work / "run", ignore_errors=True)  # readiness files of an earlier run in a reused --work
        checkpoint, act_checkpoint = build_checkpoints(base, args, work)
        raw_path = bench_config(source, work, checkpoint, args, jpeg=False)
        jpeg_path = same_endpoints(raw_path, bench_config(source, work, checkpoint, args, jpeg=True))
        config = load_config(raw_path)
        processes = Processes(raw_path, work)
        sensors_jpeg = Processes(jpeg_path, work)
        try:
            for arm in config.arms:
                processes.start("servo_emulator", arm)
                processes.start("state_reader", arm)
            armpipe = [v for v in args.variants if v in ("armpipe-raw", "armpipe-jpeg", "openpi-gateway")]
            if armpipe:
                processes.start("policy", timeout_s=900)
            for variant in args.variants:
                log.info("variant %s", variant)
                jpeg = variant == "armpipe-jpeg"
                cameras = sensors_jpeg if jpeg else processes
                names = list(config.cameras)
                for camera in names:
                    cameras.start("camera", camera)
                try:
                    if variant == "openpi-gateway":
                        result = run_gateway(raw_path, processes, args, work)
                    elif variant == "armpipe-openpi":
                        result = run_robot_on_openpi(raw_path, cameras, args, work)
                    elif variant.startswith("armpipe"):
                        cameras.start("actuator")
                        result = collect_armpipe(config.actuator.events_endpoint, variant, args.seconds, args.warmup)
                        stop_named(cameras, "actuator")
                    elif variant == "openpi-ws":
                        result = run_openpi(raw_path, args, work)
                    elif variant == "lerobot-grpc":
                        result = run_grpc(variant, raw_path, checkpoint, args.policy_type, args, work)
                        if not result.records and act_checkpoint is not None:
                            results.append(result)
                            act_config = retarget(raw_path, act_checkpoint, work)
                            result = run_grpc("lerobot-grpc (ACT)", act_config, act_checkpoint, "act", args, work)
                    else:
                        raise ValueError(f"--variants: unknown variant {variant!r}; expected some of {VARIANTS}")
                finally:
                    for camera in names:
                        stop_named(cameras, f"camera-{camera}")
                results.append(result)
                log.info("%s: %d goals%s", result.name, len(result.records),
                         f", error: {result.error}" if result.error else "")
        finally:
            sensors_jpeg.stop()
            processes.stop()
    summaries = [r.summary() for r in results]
    return {"machine": host, "label": args.label, "fps": base.fps, "policy_type": args.policy_type, "size": args.size,
            "device": args.device, "fast": args.fast, "steps": args.steps, "scheduler": args.scheduler,
            "seconds": args.seconds, "results": summaries}


def retarget(config_path: Path, checkpoint: Path, work: Path) -> Path:
    raw = yaml.safe_load(config_path.read_text())
    raw["policy"]["checkpoint"] = str(checkpoint)
    path = work / f"act-{config_path.name}"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def stop_named(processes: Processes, program: str) -> None:
    """Stop one program started by ``processes`` (SIGTERM, then SIGKILL after 10 s)."""
    for index, (name, proc) in enumerate(processes.procs):
        if name == program:
            stop_child(proc)  # type: ignore[arg-type]
            processes.procs.pop(index)
            ready = processes.run_dir / "ready" / f"{program}.json"
            ready.unlink(missing_ok=True)
            return


# ==================================================================================================
# Output
# ==================================================================================================


def fmt(stats: dict[str, float], key: str) -> str:
    value = stats.get(key)
    return "" if value is None or not math.isfinite(value) else f"{value:.1f}"


def markdown(report: dict[str, Any]) -> str:
    results = report["results"]
    lines = [f"Machine: {report['machine']}. {report['label'] or ''}".rstrip(), "",
             f"{report['policy_type']} ({report['size']}), device {report['device']}"
             f"{', fast options' if report['fast'] else ''}"
             f"{', ' + str(report['steps']) + ' steps' if report['steps'] else ''}"
             f"{' ' + report['scheduler'] if report['scheduler'] else ''}; {report['fps']} Hz; "
             f"{report['seconds']:.0f} s measured per variant, one variant after the other in one run.", "",
             "End to end (ms), capture -> goal written, per goal and for the first goal of each observation:", "",
             "| variant | goals | chunks | every goal p50 | p99 | max | first goal p50 | p99 | max | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        e2e, first = r.get("end_to_end_ms", {}), r.get("first_goal_ms", {})
        note = r["error"] or r["note"]
        lines.append(f"| {r['name']} | {r['goals']} | {r['chunks']} | {fmt(e2e, 'p50')} | {fmt(e2e, 'p99')} | "
                     f"{fmt(e2e, 'max')} | {fmt(first, 'p50')} | {fmt(first, 'p99')} | {fmt(first, 'max')} | "
                     f"{note.replace('|', '/')[:300]} |")
    ours = next((r for r in results if r["name"] == "armpipe-raw" and r.get("end_to_end_ms")), None)
    ws = next((r for r in results if r["name"] == "openpi-ws" and r.get("end_to_end_ms")), None)
    if ours and ws:
        ratio = ws["end_to_end_ms"]["p50"] / ours["end_to_end_ms"]["p50"]
        lines += ["", f"openpi-style WebSocket / armpipe (raw), end-to-end p50: **{ratio:.1f}x**."]
    lines += ["", "Per stage (ms, p50 / p99 / max):", "",
              "| stage | " + " | ".join(r["name"] for r in results if r.get("stages_ms")) + " |",
              "|---|" + "---:|" * sum(1 for r in results if r.get("stages_ms"))]
    for name, meaning in STAGES:
        cells = [f"{fmt(r['stages_ms'][name], 'p50')} / {fmt(r['stages_ms'][name], 'p99')} / "
                 f"{fmt(r['stages_ms'][name], 'max')}" for r in results if r.get("stages_ms")]
        lines.append(f"| {name} ({meaning.split(':')[0]}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in report["results"] if r.get("stages_ms")]
    if not results:
        return
    fig, (bars, dist) = plt.subplots(1, 2, figsize=(14, 5.5))
    names = [r["name"] for r in results]
    bottom = np.zeros(len(results))
    colors = plt.get_cmap("tab10").colors
    for index, stage in enumerate(STAGE_NAMES):
        values = np.array([r["stages_ms"][stage].get("mean", 0.0) for r in results])
        bars.bar(names, values, bottom=bottom, label=stage, color=colors[index % len(colors)])
        bottom += values
    bars.set_ylabel("mean ms per goal (stages sum to capture -> goal written)")
    bars.set_title("Where the time goes")
    bars.legend(fontsize=8)
    bars.tick_params(axis="x", labelrotation=20)
    for r in results:
        samples = np.sort(np.asarray(r["end_to_end_samples_ms"]))
        if len(samples):
            dist.plot(samples, np.linspace(0, 1, len(samples)), label=f"{r['name']} (p50 {np.median(samples):.0f} ms)")
    dist.set_xscale("log")
    dist.set_xlabel("capture -> goal written, ms (every goal)")
    dist.set_ylabel("fraction of goals")
    dist.set_title("End-to-end distribution")
    dist.grid(True, alpha=0.3)
    dist.legend(fontsize=8)
    fig.suptitle(f"{report['label'] or ''} {report['policy_type']} {report['device']}".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ==================================================================================================
# Entry points
# ==================================================================================================


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if argv and argv[0] == "serve-grpc":
        serve_grpc(argv[1:])
        return 0
    if argv and argv[0] in ("serve-openpi", "openpi-client", "grpc-client"):
        return child_main(argv[0], argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/lift.yaml")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds ignored once goals reach the bus")
    parser.add_argument("--checkpoint", default="", help="pretrained_model dir; default: build one")
    parser.add_argument("--policy-type", default="diffusion", choices=("diffusion", "act", *LANGUAGE_POLICIES))
    parser.add_argument("--size", default="tiny", choices=("tiny", "default"))
    parser.add_argument("--steps", type=int, default=0, help="policy.num_inference_steps (0: the checkpoint's)")
    parser.add_argument("--scheduler", default="", help="policy.noise_scheduler: DDIM or DDPM ('' keeps)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fast", action="store_true", help="bf16, compile, CUDA graphs, fast_unet (GPU)")
    parser.add_argument("--cpu-threads", type=int, default=1)
    parser.add_argument("--warmup-passes", type=int, default=2)
    parser.add_argument("--policy-timeout", type=float, default=10.0)
    parser.add_argument("--refill-rows", type=int, default=1000,
                        help="actuator.refill_rows (default: request whenever no request is in flight)")
    parser.add_argument("--overlap", default="replace", choices=("replace", "blend"))
    parser.add_argument("--variants", default="", help=f"of {','.join(VARIANTS)} (default: all; for a "
                        f"language policy {','.join(LANGUAGE_VARIANTS)}: the peers send no instruction)")
    parser.add_argument("--grpc-act", action=argparse.BooleanOptionalAction, default=True,
                        help="when LeRobot's server cannot serve the checkpoint, run it with ACT")
    parser.add_argument("--label", default="")
    parser.add_argument("--work", default="", help="keep configs, checkpoints and every process's log here")
    parser.add_argument("--out", default="", help="directory for latency.json / .md / .png (default: none)")
    args = parser.parse_args(argv)
    if not args.variants:
        args.variants = ",".join(LANGUAGE_VARIANTS if args.policy_type in LANGUAGE_POLICIES else VARIANTS)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    report = run_bench(args)
    text = markdown(report)
    log.info("\n%s", text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "latency.json").write_text(json.dumps(report, indent=1))
        (out / "latency.md").write_text(text)
        figure(report, out / "latency.png")
    return 0 if all(r.get("goals") for r in report["results"] if r["name"].startswith("armpipe")) else 1


def child_main(mode: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"bench.latency {mode}")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--policy-type", default="diffusion")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if mode == "serve-openpi":
        serve_openpi(args.config, args.port, args.ready)
    elif mode == "openpi-client":
        run_openpi_client(args.config, args.port, args.seconds, args.warmup, args.out)
    else:
        run_grpc_client(args.config, args.port, args.policy_type, args.checkpoint, args.device, args.seconds,
                        args.warmup, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
