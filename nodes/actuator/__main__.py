"""The actuator node: the control loop between the sensors, the policy and the servo bus.

Each tick (``config.fps`` on the monotonic clock, or once per new observation in lockstep) it:

1. drains the newest frame of every camera and the newest state of every arm;
2. decides hold or act: stale or missing inputs, no episode, a refused contract, an unreachable or
   failing policy, an empty queue, stale rows or a corrupt row all mean *hold the last commanded target*;
3. when acting, pops the queued row meant for this tick (``nodes.actuator.chunk_queue``) and passes it through the
   safety filter (``nodes.actuator.safety``: joint limits, max step per tick);
4. writes the target to each arm's bus (unless ``actuator.dry_run``) and publishes one ``action`` message;
5. asks the policy for the next chunk when ``actuator.refill_rows`` or fewer rows remain, in a worker thread
   so inference overlaps execution.

``ControlCore`` holds the decisions (pure logic, no sockets: the property tests drive it directly);
``ActuatorNode`` wires it to ZeroMQ, the policy worker and the bus writers. The message contract is in
docs (streams): ``action`` per tick, ``hold``/``chunk``/``episode_*``/``loop_stats``/``contract_mismatch`` events.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from common.config import DeploymentConfig, parse_node_args
from common.node import Readiness, setup_logging
from common.wire.contract import PolicyContract, contract_differences, units_differences
from common.wire.curve import CurveKeys
from common.wire.images import JpegImage
from common.wire.policy_client import ChunkReply, PolicyClient
from common.wire.protocol import (
    CONTROL_OPS,
    KIND_ACTION,
    KIND_EVENT,
    KIND_FRAME,
    KIND_REPLY,
    KIND_REQUEST,
    KIND_STATE,
    Message,
    ProtocolError,
    decode,
    error_message,
)
from common.wire.transport import (
    LatestSubscriber,
    PeerUnavailable,
    Publisher,
    RemoteError,
    RouterServer,
    SocketFactory,
    stop_event_on_signals,
)
from nodes.actuator.chunk_queue import ChunkQueue, InsertResult
from nodes.actuator.episodes import IDLE, RUNNING, STOPPING, EpisodeError, EpisodeRecord, Episodes
from nodes.actuator.safety import SafetyFilter

log = logging.getLogger("actuator")

PROGRAM = "actuator"

# Hold reasons (exact strings; see docs streams). ``bus_error`` is this node's addition: a bus that
# cannot be written (port gone) while an episode runs.
HOLD_IDLE = "idle"
HOLD_QUEUE_EMPTY = "queue_empty"
HOLD_POLICY_UNREACHABLE = "policy_unreachable"
HOLD_POLICY_ERROR = "policy_error"
HOLD_STALE_STATE = "stale_state"
HOLD_STALE_FRAME = "stale_frame"
HOLD_MISSING_INPUT = "missing_input"
HOLD_ALL_ROWS_STALE = "all_rows_stale"
HOLD_BAD_ACTION = "bad_action"
HOLD_CONTRACT_MISMATCH = "contract_mismatch"
HOLD_STOPPED = "stopped"
HOLD_BUS_ERROR = "bus_error"

CONTRACT_RECHECK_S = 2.0  # how often a refused (or unchecked) contract is asked for again
POLICY_ERROR_BACKOFF_S = 0.5  # after an error reply, wait this long before asking again ...
POLICY_ERROR_BACKOFF_MAX_S = 8.0  # ... doubling per error in a row up to this (a confused policy: no storm)
BUS_RETRY_S = 1.0
REST_REACHED_TOLERANCE = 1e-3
JOINTS_PER_ARM = 6


# ==================================================================================================
# Decisions (no sockets)
# ==================================================================================================


@dataclass
class TickDecision:
    """What one tick commands. ``target`` is NaN only while no position is known at all (no state yet)."""

    target: np.ndarray
    hold: bool
    reason: str = ""
    obs_t: float = -1.0  # observation time of the chunk the executed row came from (-1 when holding)
    row_t: float = -1.0  # the time the executed row was meant for (-1 when holding)
    write: bool = False  # whether the target goes to the bus (an episode is running or stopping)
    detail: str = ""  # why a row was refused, a policy error's message, ...
    clamped: list[str] = field(default_factory=list)  # joints of the executed row outside the limits


class ControlCore:
    """The actuator's decisions: episode state, queued rows, safety filter, hold reasons.

    Times are in the chunk queue's units: seconds of the robot's monotonic clock, or frame indices in
    lockstep (``period=1``).
    """

    def __init__(self, config: DeploymentConfig, *, period: float | None = None,
                 max_chunk_age: float | None = None) -> None:
        settings = config.actuator
        self.names = config.action_names()
        self.dim = len(self.names)
        self.period = period if period is not None else 1.0 / config.fps
        self.queue = ChunkQueue(self.period, settings.overlap, settings.blend_old_weight, action_dim=self.dim)
        self.safety = SafetyFilter(config.lower_limits(), config.upper_limits(), config.max_step(), self.names)
        self.episodes = Episodes()
        self.refill_rows = settings.refill_rows
        # A non-positive rest_step would never arrive: then the rest move uses the joints' max_step.
        self.rest_step: float | None = float(settings.rest_step) if settings.rest_step > 0 else None
        self.max_chunk_age = settings.max_chunk_age_s if max_chunk_age is None else max_chunk_age
        # Rest pose per joint (NaN where an arm has none: that arm holds where it is on stop).
        rest = []
        for arm in config.arms.values():
            rest.extend(arm.rest_pose if arm.rest_pose else [math.nan] * JOINTS_PER_ARM)
        self.rest_pose = np.asarray(rest, dtype=np.float32)
        self.rest_goal: np.ndarray | None = None
        self.policy_problem = ""  # "", HOLD_POLICY_UNREACHABLE or HOLD_POLICY_ERROR until a chunk arrives
        self.policy_message = ""
        self.last_chunk_all_stale = False
        self.generation = 0  # bumped on every episode boundary: replies to older requests are discarded
        self.ticks = 0
        self.hold_reason: str | None = None  # the current hold reason (None while acting)
        self.holds: collections.Counter[str] = collections.Counter()
        self.clamped_rows = 0  # executed rows with a value outside the joint limits (clamped)
        # After an anchor far from the subscribed state: move at rest_step until the policy's target is within
        # one max_step of the commanded one.
        self.slow_start = False

    # ------------------------------------------------------------------ episodes
    def start(self, episode_index: object = None) -> EpisodeRecord:
        record = self.episodes.start(episode_index)
        self._new_generation()
        self.safety.release()  # re-anchor on the measured position: the arm may have moved between episodes
        self.slow_start = False
        self.policy_problem = self.policy_message = ""
        return record

    def stop(self, label: object = "", reason: str = "stop") -> EpisodeRecord:
        record = self.episodes.stop(label, reason=reason)
        self._new_generation()
        if self.safety.last is not None:
            # Arms without a rest pose stay where they were last commanded.
            self.rest_goal = np.where(np.isnan(self.rest_pose), self.safety.last,
                                      np.clip(self.rest_pose, self.safety.lower, self.safety.upper))
        else:
            self.rest_goal = None
        return record

    def set_contract(self, ok: bool, differences: list[str]) -> EpisodeRecord | None:
        ended = self.episodes.set_contract(ok, differences)
        if ended is not None:
            self._new_generation()
        return ended

    def _new_generation(self) -> None:
        self.generation += 1
        self.queue.clear()
        self.last_chunk_all_stale = False

    # ------------------------------------------------------------------ policy results
    def on_chunk(self, actions: np.ndarray, obs_t: float, now: float, generation: int) -> InsertResult | None:
        """Queue a chunk that arrived at ``now``; None if it belongs to an episode that is over."""
        if generation != self.generation or self.episodes.state != RUNNING:
            return None
        self.policy_problem = self.policy_message = ""
        if now - obs_t > self.max_chunk_age:
            # Too old as a whole (actuator.max_chunk_age_s): nothing of it may run.
            self.last_chunk_all_stale = True
            return InsertResult(rows=len(actions), accepted=0, dropped_stale=len(actions), blended=0,
                                replaced=0)
        result = self.queue.insert(actions, obs_t, now)
        self.last_chunk_all_stale = result.accepted == 0
        return result

    def on_policy_failure(self, reason: str, message: str) -> None:
        self.policy_problem = reason
        self.policy_message = message

    def wants_chunk(self, now: float) -> bool:
        """Whether the next chunk should be requested now (an episode runs and the queue runs low)."""
        return (self.episodes.state == RUNNING and self.episodes.contract_ok and self.safety.anchored
                and self.queue.depth(now) <= self.refill_rows)

    # ------------------------------------------------------------------ the tick
    def tick(self, now: float, input_problem: str, measured: np.ndarray | None, bus_problem: str = "", *,
             servo_position: np.ndarray | None = None, anchor_on_servos: bool = False) -> TickDecision:
        """Decide this tick's target.

        ``input_problem`` is a hold reason from the inputs ("" when fresh); ``bus_problem`` is
        ``HOLD_BUS_ERROR`` while a bus cannot take writes. Then nothing advances: a target that never
        reached the servo must not become the reference for the next step.

        ``anchor_on_servos``: the step limit of a new episode starts from ``servo_position`` (what the bus
        reports), never from the subscribed ``measured`` state; until it is known the episode holds.
        """
        self.ticks += 1
        state = self.episodes.state
        anchor = servo_position if anchor_on_servos else measured
        if state in (RUNNING, STOPPING) and not self.safety.anchored and anchor is not None:
            self.safety.anchor(anchor)
        if state in (RUNNING, STOPPING) and bus_problem:
            decision = self._hold(bus_problem)
        elif state == STOPPING:
            decision = self._stopping_tick()
        elif state == RUNNING:
            decision = self._running_tick(now, input_problem)
        else:
            if self.episodes.contract_ok:
                reason = HOLD_IDLE
            elif self.episodes.differences:
                reason = HOLD_CONTRACT_MISMATCH
            else:
                reason = HOLD_POLICY_UNREACHABLE  # no contract yet: the policy has not answered
            decision = TickDecision(target=self._hold_target(measured), hold=True, reason=reason)
        self.hold_reason = decision.reason if decision.hold else None
        return decision

    def _running_tick(self, now: float, input_problem: str) -> TickDecision:
        if not self.safety.anchored:
            return self._hold(input_problem or HOLD_MISSING_INPUT)
        if input_problem:
            return self._hold(input_problem)
        popped = self.queue.pop(now)
        if popped is None:
            if self.policy_problem:
                return self._hold(self.policy_problem, self.policy_message)
            return self._hold(HOLD_ALL_ROWS_STALE if self.last_chunk_all_stale else HOLD_QUEUE_EMPTY)
        row, row_t, obs_t = popped
        problem = self.safety.check_row(row)
        if problem:
            return self._hold(HOLD_BAD_ACTION, problem)
        clamped = [self.names[i] for i in np.flatnonzero((row < self.safety.lower) | (row > self.safety.upper))]
        if clamped:
            self.clamped_rows += 1
        step = None
        if self.slow_start:
            step = min(self.rest_step or math.inf, float(np.min(self.safety.max_step)))
        target = self.safety.command(row, step=step)
        if self.slow_start and np.all(np.abs(np.clip(row, self.safety.lower, self.safety.upper) - target)
                                      <= self.safety.max_step):
            self.slow_start = False  # caught up with the policy: normal steps from here
        return TickDecision(target=target, hold=False, obs_t=obs_t, row_t=row_t, write=True, clamped=clamped)

    def _stopping_tick(self) -> TickDecision:
        if self.rest_goal is None or self.safety.last is None:
            self.episodes.rest_reached()
            return TickDecision(target=self._hold_target(None), hold=True, reason=HOLD_STOPPED)
        target = self.safety.command(self.rest_goal, step=self.rest_step)
        if np.all(np.abs(target - self.rest_goal) <= REST_REACHED_TOLERANCE):
            self.episodes.rest_reached()
        return TickDecision(target=target, hold=True, reason=HOLD_STOPPED, write=True)

    def _hold(self, reason: str, detail: str = "") -> TickDecision:
        anchored = self.safety.last is not None
        return TickDecision(target=self._hold_target(None), hold=True, reason=reason, write=anchored, detail=detail)

    def _hold_target(self, measured: np.ndarray | None) -> np.ndarray:
        if self.safety.last is not None:
            return self.safety.hold()
        if measured is not None and np.all(np.isfinite(measured)):
            return np.clip(np.asarray(measured, dtype=np.float32), self.safety.lower, self.safety.upper)
        return np.full(self.dim, np.nan, dtype=np.float32)


# ==================================================================================================
# Inputs
# ==================================================================================================


@dataclass
class Observation:
    """One snapshot for the policy: the newest frame of each camera and state of each arm."""

    frames: dict[str, Message]
    state: np.ndarray
    obs_t: float
    inputs: dict[str, int]
    frame_index: int


class InputBook:
    """The newest valid frame per camera and state per arm; rejects (and reports) malformed ones."""

    def __init__(self, config: DeploymentConfig) -> None:
        self.config = config
        self.frames: dict[str, Message] = {}
        self.states: dict[str, Message] = {}
        self.bad_inputs = 0
        self.refused_future = 0  # messages stamped ahead of the actuator's clock
        self.refusals: list[dict[str, Any]] = []  # future_capture_time refusals not yet published
        self.max_future_s = config.actuator.max_future_s
        self._last_warning: dict[str, float] = {}

    def ingest(self, msg: Message, now: float | None = None) -> None:
        """Keep ``msg`` if valid. With ``now`` (real time), a capture time more than ``max_future_s`` ahead of
        it is refused: sensors share the actuator's monotonic clock, and a future stamp would keep a stream
        looking fresh for as long as it lies (then the age limit holds as if it had fallen silent)."""
        if now is not None and msg.kind in (KIND_FRAME, KIND_STATE) and msg.t > now + self.max_future_s:
            self.refused_future += 1
            self.bad_inputs += 1
            stream = str(msg.meta.get("camera" if msg.kind == KIND_FRAME else "arm", "?"))
            key = f"future:{msg.kind}:{stream}"
            if now - self._last_warning.get(key, -math.inf) >= 1.0:
                self.refusals.append({"reason": "future_capture_time", "kind": msg.kind, "stream": stream,
                                      "src": msg.src, "ahead_s": msg.t - now, "count": self.refused_future})
            self._warn(key, f"refused {msg.kind} from {msg.src or '?'} ({stream}): capture time {msg.t - now:.3f}s "
                       f"ahead of this clock (actuator.max_future_s {self.max_future_s}s)", every_s=1.0)
            return
        try:
            if msg.kind == KIND_FRAME:
                self._ingest_frame(msg)
            elif msg.kind == KIND_STATE:
                self._ingest_state(msg)
        except ProtocolError as exc:
            self.bad_inputs += 1
            self._warn(f"{msg.kind}:{msg.src}", f"ignored {msg.kind} from {msg.src or '?'}: {exc}")

    def _ingest_frame(self, msg: Message) -> None:
        camera = msg.meta["camera"]
        cam = self.config.cameras.get(camera)
        if cam is None:
            raise ProtocolError("meta.camera", f"one of the configured cameras {sorted(self.config.cameras)}", camera)
        expected = [cam.height, cam.width, 3]
        image = msg.arrays.get("image")
        if image is None:
            raise ProtocolError("arrays[image]", "the camera image (field is missing)")
        if "image" in msg.jpeg:
            shape = list(msg.meta.get("_jpeg_shapes", {}).get("image", []))
            if shape != expected:
                raise ProtocolError("arrays[image].shape", f"{expected} (cameras.{camera}.height/width)", shape)
        elif image.dtype != np.uint8 or list(image.shape) != expected:
            raise ProtocolError("arrays[image]", f"uint8 {expected} (cameras.{camera}.height/width)",
                                f"{image.dtype}{list(image.shape)}")
        self.frames[camera] = msg

    def _ingest_state(self, msg: Message) -> None:
        arm_name = msg.meta["arm"]
        arm = self.config.arms.get(arm_name)
        if arm is None:
            raise ProtocolError("meta.arm", f"one of the configured arms {sorted(self.config.arms)}", arm_name)
        if list(msg.meta["names"]) != arm.joint_names():
            raise ProtocolError("meta.names", f"{arm.joint_names()} (arms.{arm_name}.prefix)", msg.meta["names"])
        position = msg.arrays.get("position")
        if position is None or position.dtype != np.float32 or position.shape != (JOINTS_PER_ARM,):
            raise ProtocolError("arrays[position]", f"float32 ({JOINTS_PER_ARM},)",
                                None if position is None else f"{position.dtype}{position.shape}")
        if not np.all(np.isfinite(position)):
            raise ProtocolError("arrays[position]", "finite joint positions", position.tolist())
        self.states[arm_name] = msg

    def _warn(self, key: str, text: str, every_s: float = 5.0) -> None:
        now = time.monotonic()
        if now - self._last_warning.get(key, -math.inf) >= every_s:
            self._last_warning[key] = now
            log.warning(text)

    # ------------------------------------------------------------------ views
    def complete(self) -> bool:
        return set(self.frames) >= set(self.config.cameras) and set(self.states) >= set(self.config.arms)

    def measured(self) -> np.ndarray | None:
        """Every arm's newest position in config order, or None if an arm has not reported yet."""
        if not set(self.states) >= set(self.config.arms):
            return None
        return np.concatenate([self.states[name].arrays["position"] for name in self.config.arms]).astype(np.float32)

    def problem(self, now: float) -> str:
        """The hold reason the inputs give at ``now`` ("" when everything is present and fresh)."""
        if not self.complete():
            return HOLD_MISSING_INPUT
        for name, arm in self.config.arms.items():
            if now - self.states[name].t > arm.max_state_age_s:
                return HOLD_STALE_STATE
        for name, cam in self.config.cameras.items():
            if now - self.frames[name].t > cam.max_age_s:
                return HOLD_STALE_FRAME
        return ""

    def input_seqs(self) -> dict[str, int]:
        return {**{name: msg.seq for name, msg in self.frames.items()},
                **{name: msg.seq for name, msg in self.states.items()}}

    def frame_index(self) -> int:
        """The dataset frame index of the newest frames (the player stamps it), -1 from live cameras."""
        indices = [msg.meta.get("frame_index") for msg in (*self.frames.values(), *self.states.values())]
        if not indices or any(not isinstance(index, int) or isinstance(index, bool) for index in indices):
            return -1
        return min(indices)

    def observation(self) -> Observation:
        measured = self.measured()
        assert measured is not None and self.complete()
        parts = [*self.frames.values(), *self.states.values()]
        return Observation(frames=dict(self.frames), state=measured, obs_t=min(msg.t for msg in parts),
                           inputs=self.input_seqs(), frame_index=self.frame_index())


# ==================================================================================================
# Policy worker (owns the REQ socket: ZeroMQ sockets are not thread-safe)
# ==================================================================================================


@dataclass
class Job:
    kind: str  # "contract" | "reset" | "infer"
    generation: int = 0
    observation: Observation | None = None
    obs_t: float = 0.0  # the time sent to the policy (lockstep: the frame index)


@dataclass
class JobResult:
    job: Job
    contract: PolicyContract | None = None
    reply: ChunkReply | None = None
    error: Exception | None = None


class PolicyWorker(threading.Thread):
    """Runs policy requests one at a time so the control loop never blocks on the network."""

    def __init__(self, factory: SocketFactory, config: DeploymentConfig, client_id: str) -> None:
        super().__init__(name="policy-worker", daemon=True)
        self.factory = factory
        self.config = config
        self.client_id = client_id
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.results: queue.Queue[JobResult] = queue.Queue()
        self.pending = 0  # jobs submitted whose result has not been taken yet (main thread only)
        # Frames go to the policy as they came: a JPEG camera's bytes as received (never decoded and encoded
        # again), a raw frame raw unless its camera asks for JPEG (then at that camera's jpeg_quality).
        self.jpeg_quality = {name: cam.jpeg_quality for name, cam in config.cameras.items() if cam.encoding == "jpeg"}

    def submit(self, job: Job) -> None:
        self.pending += 1
        self.jobs.put(job)

    def take(self, timeout_s: float | None = None) -> JobResult | None:
        try:
            result = self.results.get(timeout=timeout_s) if timeout_s else self.results.get_nowait()
        except queue.Empty:
            return None
        self.pending -= 1
        return result

    def close(self) -> None:
        self.jobs.put(None)

    def run(self) -> None:
        policy = self.config.policy
        client = PolicyClient(self.factory, policy.endpoint, client_id=self.client_id, timeout_s=policy.timeout_s,
                              retries=policy.retries)
        try:
            while (job := self.jobs.get()) is not None:
                try:
                    self.results.put(self._run(client, job))
                except Exception as exc:  # reported to the loop, which holds; the worker keeps serving
                    self.results.put(JobResult(job=job, error=exc))
        finally:
            client.close()

    def _run(self, client: PolicyClient, job: Job) -> JobResult:
        if job.kind == "contract":
            return JobResult(job=job, contract=client.metadata())
        if job.kind == "reset":
            client.reset()
            return JobResult(job=job)
        observation = job.observation
        assert observation is not None
        images = {camera: JpegImage.of_message(msg) if "image" in msg.jpeg else msg.arrays["image"]
                  for camera, msg in observation.frames.items()}
        return JobResult(job=job, reply=client.infer(images, observation.state, job.obs_t, jpeg=self.jpeg_quality))


# ==================================================================================================
# Bus writers (one thread per arm, so bus contention never delays a tick)
# ==================================================================================================


class BusWriter(threading.Thread):
    """Writes the newest target of one arm through ``common.feetech_bus.ArmBus``; reconnects on failure."""

    def __init__(self, arm_name: str, config: DeploymentConfig, stop: threading.Event) -> None:
        super().__init__(name=f"bus-{arm_name}", daemon=True)
        self.arm_name = arm_name
        self.arm = config.arms[arm_name]
        self.stop_event = stop
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._target: np.ndarray | None = None
        self.connected = False
        self.last_error = ""
        self.writes = 0
        # Present_Position read through this writer's own bus for an episode (generation) that asked for it:
        # the episode's step limit starts there, not at whatever the state stream says.
        self._present_wanted: int | None = None
        self._present: tuple[int, np.ndarray] | None = None

    @property
    def healthy(self) -> bool:
        return self.connected and not self.last_error

    def request_present(self, generation: int) -> None:
        """Read the servos' present position (before any further write) for episode ``generation``."""
        with self._lock:
            self._present_wanted = generation
            self._target = None  # a target meant for the previous episode must not go out first
        self._wake.set()

    def present_for(self, generation: int) -> np.ndarray | None:
        present = self._present
        return present[1] if present is not None and present[0] == generation else None

    def submit(self, target: np.ndarray) -> None:
        with self._lock:
            self._target = np.array(target, dtype=np.float32)
        self._wake.set()

    def run(self) -> None:
        from common.feetech_bus import ArmBus  # lazy: LeRobot's bus stack is only needed when writing

        bus: Any = None
        while not self.stop_event.is_set():
            if bus is None:
                try:
                    bus = ArmBus(self.arm, name=self.arm_name)
                    bus.connect()
                    self.connected, self.last_error = True, ""
                    log.info("arm %s: bus %s connected", self.arm_name, self.arm.port)
                except Exception as exc:
                    bus = None
                    self.connected = False
                    self._report(f"cannot open bus {self.arm.port}: {exc}")
                    self.stop_event.wait(BUS_RETRY_S)
                    continue
            if self._present_wanted is not None:
                wanted = self._present_wanted
                try:
                    position = bus.read_positions()
                except Exception as exc:
                    self._report(f"read of the present position from {self.arm.port} failed: {exc}; reconnecting")
                    self.connected = False
                    self._close(bus)
                    bus = None
                    continue
                with self._lock:
                    if self._present_wanted == wanted:
                        self._present_wanted = None
                self._present = (wanted, position)
                log.info("arm %s: present position %s (episode anchor)", self.arm_name, np.round(position, 1).tolist())
            if not self._wake.wait(timeout=0.1):
                continue
            self._wake.clear()
            with self._lock:
                target, self._target = self._target, None
            if target is None or self._present_wanted is not None:
                continue
            try:
                bus.write_goals(target)
                self.writes += 1
                self.last_error = ""
            except ValueError as exc:
                # A goal the driver cannot encode (outside the calibrated range): the bus itself is fine.
                self._report(f"goal refused by the driver: {exc}")
            except Exception as exc:
                self._report(f"write to {self.arm.port} failed: {exc}; reconnecting")
                self.connected = False
                self._close(bus)
                bus = None
        if bus is not None:
            self._close(bus)

    def _report(self, text: str) -> None:
        if text != self.last_error:
            log.error("arm %s: %s", self.arm_name, text)
        self.last_error = text

    def _close(self, bus: Any) -> None:
        try:
            bus.disconnect()
        except Exception as exc:
            log.warning("arm %s: closing the bus: %s", self.arm_name, exc)


# ==================================================================================================
# The node
# ==================================================================================================


@dataclass
class LoopStats:
    window: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=4096))
    missed_ticks: int = 0
    last_report: float = 0.0

    def percentiles(self) -> tuple[float, float]:
        if not self.window:
            return 0.0, 0.0
        values = np.asarray(self.window)
        return float(np.percentile(values, 50)), float(np.percentile(values, 99))


class ActuatorNode:
    def __init__(self, config: DeploymentConfig, stop: threading.Event, curve: CurveKeys | None = None) -> None:
        self.config = config
        self.settings = config.actuator
        self.stop_event = stop
        self.lockstep = self.settings.lockstep
        self.period = 1.0 / config.fps
        # Lockstep keeps time in frame indices (row j of a chunk from frame i runs at frame i + j); a chunk is
        # never too old there because it is requested for the very frame it runs on.
        self.core = ControlCore(config, period=1.0 if self.lockstep else None,
                                max_chunk_age=math.inf if self.lockstep else None)
        self.inputs = InputBook(config)
        self.factory = SocketFactory()
        endpoints = [cam.endpoint for cam in config.cameras.values()]
        endpoints += [arm.state_endpoint for arm in config.arms.values()]
        self.subscriber = LatestSubscriber(self.factory, endpoints)
        self.events = Publisher(self.factory, self.settings.events_endpoint, PROGRAM)
        self.control = RouterServer(self.factory, self.settings.control_endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.subscriber.sock, zmq.POLLIN)
        self.poller.register(self.control.sock, zmq.POLLIN)
        self.client_id = f"actuator-{config.task}-{uuid.uuid4().hex[:8]}"
        # The policy link may cross hosts (CURVE, common.wire.curve); every other socket here is loopback.
        policy_factory = SocketFactory(curve=curve) if curve is not None else self.factory
        self.worker = PolicyWorker(policy_factory, config, self.client_id)
        self.writers: dict[str, BusWriter] = {}
        if not self.settings.dry_run:
            self.writers = {name: BusWriter(name, config, stop) for name in config.arms}
        self.readiness = Readiness(config, PROGRAM)
        self.started_at = time.monotonic()
        self.contract: PolicyContract | None = None
        self.contract_checked = False
        self.needs_contract = True
        self.next_contract_check = 0.0
        self.next_request_at = 0.0
        self.auto_start_armed = self.settings.auto_start
        self.stats = LoopStats()
        self.last_lockstep_t: dict[str, float] = {}
        self.lockstep_key = -1
        self.clamping = False  # the last executed row was clamped (a clamped event per clamped stretch)
        self.policy_errors = 0  # policy_error events, and how many came in a row (for the back-off)
        self.policy_error_streak = 0

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> None:
        self.worker.start()
        for writer in self.writers.values():
            writer.start()
        log.info("actuator up: %d camera(s), %d arm(s), %s, %s, overlap=%s, refill_rows=%d, events %s, "
                 "control %s", len(self.config.cameras), len(self.config.arms),
                 "dry-run" if self.settings.dry_run else "writing to the bus",
                 "lockstep" if self.lockstep else f"{self.config.fps} Hz", self.settings.overlap,
                 self.settings.refill_rows, self.settings.events_endpoint, self.settings.control_endpoint)
        try:
            if self.lockstep:
                self._run_lockstep()
            else:
                self._run_realtime()
        finally:
            self.readiness.clear()
            self.worker.close()
            for writer in self.writers.values():
                writer.join(timeout=2.0)
            self.subscriber.close()
            self.events.close()
            self.control.close()
            log.info("actuator stopped after %d ticks", self.core.ticks)

    def _run_realtime(self) -> None:
        deadline = time.monotonic()
        while not self.stop_event.is_set():
            self._wait_until(deadline)
            started = time.monotonic()
            lateness = started - deadline
            self._tick(now=started, scheduled=deadline, lateness=lateness)
            deadline += self.period
            behind = time.monotonic() - deadline
            if behind > self.period:
                # Whole ticks were missed: skip them rather than run a burst of late ticks.
                skipped = int(behind // self.period)
                self.stats.missed_ticks += skipped
                deadline += skipped * self.period

    def _run_lockstep(self) -> None:
        while not self.stop_event.is_set():
            self._service(timeout_s=0.02)
            # The contract check and episode start must not wait for the first observation: the player
            # may wait for the actuator to be ready before it publishes anything.
            self._take_results(time.monotonic(), float(self.lockstep_key))
            self._maybe_check_contract(time.monotonic())
            if self._new_complete_observation():
                self._tick(now=time.monotonic(), scheduled=float(self.lockstep_key), lateness=0.0)
            self._maybe_report()

    def _wait_until(self, deadline: float) -> None:
        """Serve inputs and control requests until ``deadline`` (zmq polls in ms; the rest is a short sleep)."""
        while not self.stop_event.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if remaining < 0.002:
                # zmq polls in whole milliseconds: finish with a plain sleep, which is finer.
                time.sleep(remaining)
                return
            self._service(timeout_s=remaining - 0.001)

    def _service(self, timeout_s: float) -> None:
        ready = dict(self.poller.poll(max(0, int(timeout_s * 1000))))
        if self.subscriber.sock in ready:
            self._ingest()
        if self.control.sock in ready:
            while (request := self.control.receive(0.0)) is not None:
                self._handle_control(*request)

    # ------------------------------------------------------------------ one tick
    def _ingest(self) -> None:
        for msg in self.subscriber.poll(0.0):
            # Lockstep stamps are the player's; ages are not checked there, so neither is the future.
            self.inputs.ingest(msg, None if self.lockstep else time.monotonic())
        for refusal in self.inputs.refusals:
            self._publish_event("input_refused", **refusal)
        self.inputs.refusals.clear()
        for recovery in self.subscriber.take_reconnects():
            self._publish_event("reconnected", endpoint=recovery.endpoint, reason=recovery.reason)

    def _tick(self, *, now: float, scheduled: float, lateness: float) -> None:
        self._ingest()
        self._take_results(now, scheduled)
        self._maybe_check_contract(now)
        if self.lockstep:
            input_problem = "" if self.inputs.complete() else HOLD_MISSING_INPUT
        else:
            input_problem = self.inputs.problem(now)
        measured = self.inputs.measured()
        if self.lockstep and not input_problem and not self.needs_contract:
            self._lockstep_refill(scheduled, measured)
        previous_reason = self.core.hold_reason
        broken = [f"{w.arm_name}: {w.last_error or 'connecting'}" for w in self.writers.values() if not w.healthy]
        was_anchored = self.core.safety.anchored
        servo_position = self._servo_position()
        decision = self.core.tick(scheduled, input_problem, measured, HOLD_BUS_ERROR if broken else "",
                                  servo_position=servo_position, anchor_on_servos=bool(self.writers))
        if decision.reason == HOLD_BUS_ERROR:
            decision.detail = "; ".join(broken)
        if not was_anchored and self.core.safety.anchored and self.writers:
            self._anchored_on_servos(servo_position, measured)
        if decision.clamped and not self.clamping:
            self._publish_event("clamped", joints=decision.clamped, count=self.core.clamped_rows)
            log.warning("policy row outside the joint limits for %s: clamped", decision.clamped)
        self.clamping = bool(decision.clamped)
        if decision.write and self.writers:
            self._write(decision.target)
        if decision.hold and decision.reason != previous_reason:
            self.core.holds[decision.reason] += 1
            self._publish_event("hold", reason=decision.reason, count=self.core.holds[decision.reason],
                                message=decision.detail)
            level = logging.DEBUG if decision.reason == HOLD_IDLE else logging.INFO
            log.log(level, "hold: %s%s", decision.reason, f" ({decision.detail})" if decision.detail else "")
        elif decision.detail and decision.reason == HOLD_BAD_ACTION:
            log.warning("refused action row: %s", decision.detail)
        self._publish_action(decision, now, lateness)
        if (not self.lockstep and not input_problem and not self.needs_contract and self.worker.pending == 0
                and now >= self.next_request_at and self.core.wants_chunk(scheduled)):
            observation = self.inputs.observation()
            self.worker.submit(Job("infer", self.core.generation, observation, obs_t=observation.obs_t))
        self.stats.window.append(lateness)
        self._maybe_report()

    def _servo_position(self) -> np.ndarray | None:
        """Every arm's present position as its own bus reports it, read since this episode started; None
        until all are in (or in dry-run, where there is no bus)."""
        if not self.writers:
            return None
        parts = [w.present_for(self.core.generation) for w in self.writers.values()]
        if any(part is None for part in parts):
            return None
        return np.concatenate(parts).astype(np.float32)  # type: ignore[arg-type]

    def _anchored_on_servos(self, servo: np.ndarray | None, measured: np.ndarray | None) -> None:
        if servo is None or measured is None:
            return
        gap = np.abs(servo - measured)
        far = np.flatnonzero(gap > self.settings.anchor_tolerance)
        if not far.size:
            return
        joints = [self.core.names[i] for i in far]
        self.core.slow_start = True
        log.warning("episode start: the servos are away from the subscribed state by more than %g for %s; moving "
                    "slowly (rest_step) towards the policy's first target", self.settings.anchor_tolerance,
                    {self.core.names[i]: (float(servo[i]), float(measured[i])) for i in far})
        self._publish_event("anchor_mismatch", joints=joints, servo=servo.tolist(), state=measured.tolist(),
                            tolerance=self.settings.anchor_tolerance)

    def _write(self, target: np.ndarray) -> None:
        if not np.all(np.isfinite(target)):
            return
        for index, writer in enumerate(self.writers.values()):
            writer.submit(target[index * JOINTS_PER_ARM:(index + 1) * JOINTS_PER_ARM])

    def _lockstep_refill(self, key: float, measured: np.ndarray | None) -> None:
        """Lockstep: ask for a chunk from this very observation and wait for it before the tick runs."""
        core = self.core
        if core.episodes.state != RUNNING or not core.episodes.contract_ok:
            return
        if not core.safety.anchored and measured is not None:
            core.safety.anchor(measured)
        if not core.wants_chunk(key):
            return
        observation = self.inputs.observation()
        self.worker.submit(Job("infer", core.generation, observation, obs_t=key))
        deadline = time.monotonic() + self.config.policy.timeout_s * max(1, self.config.policy.retries) + 1.0
        while self.worker.pending and time.monotonic() < deadline and not self.stop_event.is_set():
            result = self.worker.take(timeout_s=0.05)
            if result is not None:
                self._handle_result(result, now=key)

    # ------------------------------------------------------------------ lockstep input tracking
    def _new_complete_observation(self) -> bool:
        """True once every camera and arm delivered a message newer than the ones used at the last tick."""
        if not self.inputs.complete():
            return False
        parts = {**self.inputs.frames, **self.inputs.states}
        if any(msg.t <= self.last_lockstep_t.get(name, -math.inf) for name, msg in parts.items()):
            return False
        self.last_lockstep_t = {name: msg.t for name, msg in parts.items()}
        index = self.inputs.frame_index()
        key = index if index >= 0 else self.lockstep_key + 1
        if key < self.lockstep_key:
            # The player went back (a new dataset episode): the queued rows and the policy's history are void.
            self.core.queue.clear()
            if self.core.episodes.state == RUNNING:
                self.worker.submit(Job("reset", self.core.generation))
        self.lockstep_key = key
        return True

    # ------------------------------------------------------------------ policy results
    def _take_results(self, now: float, scheduled: float) -> None:
        while (result := self.worker.take()) is not None:
            self._handle_result(result, now=scheduled if self.lockstep else now)

    def _handle_result(self, result: JobResult, now: float) -> None:
        job, error = result.job, result.error
        if error is not None:
            self._policy_failed(job, error)
            return
        if job.kind == "contract":
            assert result.contract is not None
            self._contract_checked(result.contract)
        elif job.kind == "infer":
            assert result.reply is not None
            self._chunk_arrived(job, result.reply, now)

    def _policy_failed(self, job: Job, error: Exception) -> None:
        if isinstance(error, PeerUnavailable):
            if self.core.policy_problem != HOLD_POLICY_UNREACHABLE:
                log.warning("policy unreachable (%s): %s", job.kind, error)
            self.core.on_policy_failure(HOLD_POLICY_UNREACHABLE, str(error))
            # A policy that comes back may be a different checkpoint: check its contract before using it.
            self.needs_contract = True
            self.next_contract_check = 0.0
            return
        if isinstance(error, RemoteError):
            text = (f"policy answered {job.kind} with an error: {error} (field {error.field!r}, "
                    f"expected {error.expected})")
        else:
            text = f"policy {job.kind} failed: {type(error).__name__}: {error}"
        self._policy_error(job.kind, text)

    def _policy_error(self, op: str, text: str) -> None:
        """Hold (``policy_error``), publish it, and wait before asking again: twice as long per error in a row."""
        log.error(text)
        self.core.on_policy_failure(HOLD_POLICY_ERROR, text)
        backoff = min(POLICY_ERROR_BACKOFF_S * 2 ** self.policy_error_streak, POLICY_ERROR_BACKOFF_MAX_S)
        self.policy_error_streak += 1
        self.policy_errors += 1
        self.next_request_at = time.monotonic() + backoff
        self._publish_event("policy_error", op=op, message=text, count=self.policy_errors, backoff_s=backoff)

    def _contract_checked(self, contract: PolicyContract) -> None:
        differences = contract_differences(contract, self.config)
        units = units_differences(contract, self.config)
        if units and self.settings.units_mismatch_intended:
            if contract.checkpoint_id != getattr(self.contract, "checkpoint_id", None):
                log.warning("the checkpoint's dataset stats disagree with the arms' units/limits; accepted because "
                            "actuator.units_mismatch_intended is true:\n  %s", "\n  ".join(units))
                self._publish_event("units_mismatch", differences=units, intended=True,
                                    checkpoint_id=contract.checkpoint_id)
        else:
            differences += units
        was_ok = self.core.episodes.contract_ok
        self.contract = contract
        self.needs_contract = bool(differences)
        self.next_contract_check = time.monotonic() + CONTRACT_RECHECK_S
        if self.core.policy_problem == HOLD_POLICY_UNREACHABLE:
            self.core.on_policy_failure("", "")
        ended = self.core.set_contract(not differences, differences)
        if differences:
            if was_ok or not self.contract_checked:
                log.error("policy contract does not match the config; refusing to move:\n  %s",
                          "\n  ".join(differences))
            self._publish_event("contract_mismatch", differences=differences, checkpoint_id=contract.checkpoint_id)
            if ended is not None:
                self._publish_episode("episode_stop", ended, reason="contract_mismatch")
        elif not was_ok:
            log.info("policy contract matches (%s %s, chunk %d, checkpoint %s%s)", contract.policy_type,
                     contract.device, contract.chunk_length, contract.checkpoint_id,
                     ", UNTRAINED" if contract.untrained else "")
            if self.auto_start_armed and self.core.episodes.state == IDLE:
                self._start_episode(None)
        if not self.contract_checked:
            self.contract_checked = True
            self._mark_ready()

    def _chunk_problem(self, job: Job, reply: ChunkReply) -> str:
        """Why a reply cannot be used ("" when it can): it may only say what was asked. Its rows must be
        the contract's chunk_length of action_dim values, and its echoed obs_t the one this request sent
        (the chunk is timed by the sent one: a lying echo must not make old rows look new)."""
        actions = reply.actions
        rows = self.contract.chunk_length if self.contract is not None else None
        if actions.ndim != 2 or actions.shape[1] != self.core.dim:
            return (f"policy chunk refused: arrays[action] has shape {list(actions.shape)}, expected "
                    f"[rows, {self.core.dim}] ({self.core.dim} action values per row)")
        if actions.shape[0] == 0 or (rows is not None and actions.shape[0] != rows):
            return (f"policy chunk refused: arrays[action] has {actions.shape[0]} rows, the contract's chunk_length "
                    f"is {rows}")
        if not (math.isfinite(reply.obs_t) and reply.obs_t == float(job.obs_t)):
            return (f"policy chunk refused: meta.obs_t echoed {reply.obs_t!r}, the request sent {float(job.obs_t)!r} "
                    "(the policy must echo the observation time unchanged)")
        return ""

    def _chunk_arrived(self, job: Job, reply: ChunkReply, now: float) -> None:
        if job.generation != self.core.generation:
            return  # an episode boundary passed: the chunk is void anyway
        problem = self._chunk_problem(job, reply)
        if problem:
            self._policy_error("infer", problem)
            return
        try:
            result = self.core.on_chunk(reply.actions, float(job.obs_t), now, job.generation)
        except ValueError as exc:
            self._policy_error("infer", f"policy chunk unusable: {exc}")
            return
        if result is None:
            return
        self.policy_error_streak = 0
        self._publish_event("chunk", arrays={"chunk": np.ascontiguousarray(reply.actions, dtype=np.float32)},
                            rows=result.rows, accepted=result.accepted, dropped_stale=result.dropped_stale,
                            blended=result.blended, replaced=result.replaced, obs_t=reply.obs_t, arrival_t=now,
                            round_trip_s=reply.round_trip_s, timings=reply.timings,
                            queue_depth=self.core.queue.depth(now))

    def _maybe_check_contract(self, now: float) -> None:
        if self.needs_contract and self.worker.pending == 0 and now >= self.next_contract_check:
            self.next_contract_check = now + CONTRACT_RECHECK_S
            self.worker.submit(Job("contract"))
        wait = self.settings.contract_wait_s
        if not self.contract_checked and wait > 0 and now - self.started_at > wait and not self.readiness.path.exists():
            log.warning("no contract from the policy at %s after %.1fs; ready, but refusing to start until it "
                        "answers", self.config.policy.endpoint, wait)
            self._mark_ready()

    def _mark_ready(self) -> None:
        contract = "ok" if self.core.episodes.contract_ok else "mismatch" if self.contract_checked else "unchecked"
        self.readiness.ready(contract=contract, differences=self.core.episodes.differences,
                             dry_run=self.settings.dry_run, lockstep=self.lockstep)

    # ------------------------------------------------------------------ control socket
    def _handle_control(self, envelope: list[bytes], frames: list[Any]) -> None:
        try:
            request = decode(frames)
        except ProtocolError as exc:
            self.control.reply(envelope, error_message(exc, src=PROGRAM))
            return
        op = str(request.meta.get("op", ""))
        try:
            if request.kind != KIND_REQUEST:
                raise ProtocolError("kind", "request", request.kind)
            if op not in CONTROL_OPS:
                raise ProtocolError("meta.op", f"one of {list(CONTROL_OPS)}", op)
            meta = getattr(self, f"_op_{op}")(request.meta)
            reply = Message(kind=KIND_REPLY, src=PROGRAM, seq=request.seq, meta={"op": op, **meta})
        except (ProtocolError, EpisodeError) as exc:
            log.info("control %s refused: %s", op or "?", exc)
            reply = error_message(exc, src=PROGRAM, seq=request.seq, op=op)
        except Exception as exc:  # a bug must not take the control loop down: answer, log, carry on
            log.exception("control %s failed", op)
            reply = error_message(exc, src=PROGRAM, seq=request.seq, op=op)
        self.control.reply(envelope, reply)

    def _op_start(self, meta: dict[str, Any]) -> dict[str, Any]:
        record = self._start_episode(meta.get("episode_index"))
        return {"episode_index": record.index, "state": self.core.episodes.public_state}

    def _op_stop(self, meta: dict[str, Any]) -> dict[str, Any]:
        record = self.core.stop(meta.get("label", ""))
        self._publish_episode("episode_stop", record, reason="stop")
        log.info("episode %d stopped%s", record.index, f" ({record.label})" if record.label else "")
        return {"episode_index": record.index, "label": record.label, "state": self.core.episodes.public_state}

    def _op_label(self, meta: dict[str, Any]) -> dict[str, Any]:
        record = self.core.episodes.label(meta.get("label"), meta.get("episode_index"))
        self._publish_episode("episode_label", record, reason="label")
        log.info("episode %d labelled %s", record.index, record.label)
        return {"episode_index": record.index, "label": record.label}

    def _op_status(self, meta: dict[str, Any]) -> dict[str, Any]:
        del meta
        episodes = self.core.episodes
        contract = self.contract
        return {"state": episodes.public_state, "episode_index": episodes.episode_index,
                "holds": dict(self.core.holds), "ticks": self.core.ticks, "contract_ok": episodes.contract_ok,
                "differences": episodes.differences, "hold_reason": self.core.hold_reason or "",
                "queue_depth": len(self.core.queue), "dry_run": self.settings.dry_run, "lockstep": self.lockstep,
                "checkpoint_id": contract.checkpoint_id if contract else "",
                "untrained": bool(contract.untrained) if contract else False,
                "last_stopped": episodes.last_stopped.index if episodes.last_stopped else -1,
                "last_label": episodes.last_stopped.label if episodes.last_stopped else "",
                "bus": {name: {"connected": w.connected, "error": w.last_error, "writes": w.writes}
                        for name, w in self.writers.items()}}

    def _start_episode(self, episode_index: object) -> EpisodeRecord:
        record = self.core.start(episode_index)
        for writer in self.writers.values():
            writer.request_present(self.core.generation)  # the new episode's step limit starts there
        # A fresh policy session per episode: DiffusionPolicy keeps observation history per client.
        self.worker.submit(Job("reset", self.core.generation))
        self._publish_episode("episode_start", record, reason="start")
        log.info("episode %d started", record.index)
        return record

    # ------------------------------------------------------------------ publishing
    def _publish_action(self, decision: TickDecision, now: float, lateness: float) -> None:
        meta = {"role": "executed", "names": self.core.names, "tick": self.core.ticks, "hold": decision.hold,
                "hold_reason": decision.reason if decision.hold else "",
                "episode_index": self.core.episodes.episode_index, "obs_t": decision.obs_t, "row_t": decision.row_t,
                "inputs": self.inputs.input_seqs(),
                "frame_index": self.lockstep_key if self.lockstep else self.inputs.frame_index(),
                "queue_depth": len(self.core.queue), "lateness_s": lateness, "dry_run": self.settings.dry_run}
        self.events.publish(Message(kind=KIND_ACTION, t=now, meta=meta, arrays={"action": decision.target}))

    def _publish_event(self, event: str, arrays: dict[str, np.ndarray] | None = None, **meta: Any) -> None:
        self.events.publish(Message(kind=KIND_EVENT, meta={"event": event, **meta}, arrays=arrays or {}))

    def _publish_episode(self, event: str, record: EpisodeRecord, reason: str) -> None:
        self._publish_event(event, episode_index=record.index, label=record.label, reason=reason)

    def _maybe_report(self) -> None:
        now = time.monotonic()
        if now - self.stats.last_report < 1.0:
            return
        self.stats.last_report = now
        p50, p99 = self.stats.percentiles()
        self.stats.window.clear()
        self._publish_event("loop_stats", lateness_p50_s=p50, lateness_p99_s=p99, ticks=self.core.ticks,
                            holds=dict(self.core.holds), queue_depth=len(self.core.queue),
                            state=self.core.episodes.public_state, contract_ok=self.core.episodes.contract_ok,
                            missed_ticks=self.stats.missed_ticks, bad_inputs=self.inputs.bad_inputs,
                            hold_reason=self.core.hold_reason or "", clamped_rows=self.core.clamped_rows,
                            policy_errors=self.policy_errors, refused_future=self.inputs.refused_future,
                            reconnects=self.subscriber.reconnect_count)


def set_priority(nice: int) -> None:
    """Apply ``actuator.nice`` (range-checked with the config; a failure to raise the priority is logged,
    not fatal)."""
    if nice == 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        log.info("running at nice %d", nice)
    except PermissionError:
        log.warning("actuator.nice=%d needs root or CAP_SYS_NICE; running at nice %d", nice,
                    os.getpriority(os.PRIO_PROCESS, 0))


def main(argv: list[str] | None = None) -> None:
    setup_logging(PROGRAM)
    args = parse_node_args("armpipe actuator: the control loop (policy chunks -> safe goal positions)", argv,
                           curve_side="client")
    set_priority(args.config.actuator.nice)
    stop = stop_event_on_signals()
    ActuatorNode(args.config, stop, args.curve).run()


if __name__ == "__main__":
    main()
