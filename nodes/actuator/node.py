"""The actuator node's wiring, shared by its two loops (``nodes.actuator.__main__``): the sockets, the
policy worker and bus writers, the policy's results and contract, the control socket and what is published.

``ActuatorNode.act`` is the part of a tick both loops share: decide with the core, write the bus, publish.
The loops differ only in when a tick runs and how the next chunk is asked for (see ``__main__``).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from common.config import DeploymentConfig
from common.node import Readiness
from common.streams import sensor_endpoints
from common.wire.contract import PolicyContract, contract_differences, units_differences
from common.wire.curve import CurveKeys
from common.wire.policy_client import ChunkReply
from common.wire.protocol import (
    KIND_ACTION,
    KIND_EVENT,
    KIND_FRAME,
    Message,
)
from common.wire.transport import LatestSubscriber, PeerUnavailable, Publisher, RemoteError, RouterServer, SocketFactory
from nodes.actuator import PROGRAM
from nodes.actuator.autostart import AutoStartWait
from nodes.actuator.backlog import Backlog
from nodes.actuator.chunk_queue import CoverageNotice
from nodes.actuator.control import ControlOps
from nodes.actuator.core import JOINTS_PER_ARM, ControlCore, TickDecision
from nodes.actuator.episodes import IDLE, RUNNING, EpisodeRecord
from nodes.actuator.holds import (
    HOLD_BAD_ACTION,
    HOLD_BUS_ERROR,
    HOLD_IDLE,
    HOLD_MISSING_INPUT,
    HOLD_POLICY_ERROR,
    HOLD_POLICY_UNREACHABLE,
)
from nodes.actuator.inputs import InputBook, Observation
from nodes.actuator.latency import LatencyTracker
from nodes.actuator.workers import BusWriter, Job, JobResult, PolicyWorker

log = logging.getLogger("actuator")


# Messages the events publisher queues per subscriber before dropping: a few seconds of ticks and events (~90 a
# second), so a recorder or a test tap whose process (or this one's I/O thread) is starved for a moment on a loaded
# machine loses nothing; 4 (the default) lost ticks while a restarted recorder started up.
EVENTS_HWM = 1024
CONTRACT_RECHECK_S = 2.0  # how often a refused (or unchecked) contract is asked for again
POLICY_ERROR_BACKOFF_S = 0.5  # after an error reply, wait this long before asking again ...
POLICY_ERROR_BACKOFF_MAX_S = 8.0  # ... doubling per error in a row up to this (a confused policy: no storm)


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


class ActuatorNode(ControlOps):
    """What both loops share. A loop (``RealtimeLoop`` or ``LockstepLoop``) gives the core its time units and
    implements ``loop()``; each of its ticks calls ``act()``."""

    def __init__(self, config: DeploymentConfig, stop: threading.Event, core: ControlCore, readiness: Readiness,
                 curve: CurveKeys | None = None) -> None:
        self.config = config
        self.settings = config.actuator
        self.stop_event = stop
        self.period = 1.0 / config.fps
        self.core = core
        self.inputs = InputBook(config)
        self.factory = SocketFactory()
        self.subscriber = LatestSubscriber(self.factory, sensor_endpoints(config))
        # Everything published is also kept a while for a recorder restarted mid-episode (the control socket's
        # backlog op; nodes/actuator/backlog.py): the small streams it missed, filled in when it resumes.
        self.backlog = Backlog(config.fps, lambda: self.inputs.measured(),
                               lambda: self.core.episodes.active.uid if self.core.episodes.active else "")
        self.events = self.backlog.wrap(Publisher(self.factory, self.settings.events_endpoint, PROGRAM, hwm=EVENTS_HWM))
        self.control = RouterServer(self.factory, self.settings.control_endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.subscriber.sock, zmq.POLLIN)
        self.poller.register(self.control.sock, zmq.POLLIN)
        self.client_id = f"actuator-{config.task}-{uuid.uuid4().hex[:8]}"
        # The policy link may cross hosts (CURVE, common.wire.curve); every other socket here is loopback.
        policy_factory = SocketFactory(curve=curve) if curve is not None else self.factory
        self.worker = PolicyWorker(policy_factory, config, self.client_id)
        self.poller.register(self.worker.wakeup_fd, zmq.POLLIN)  # a policy result landed
        self.writers: dict[str, BusWriter] = {}
        if not self.settings.dry_run:
            self.writers = {name: BusWriter(name, config, stop) for name in config.arms}
        self.readiness = readiness  # cleared at start (common.node.start_node)
        self.started_at = time.monotonic()
        self.contract: PolicyContract | None = None
        self.contract_checked = False
        # The task in words for a language policy: actuator.instruction, changed between episodes by the control
        # socket's instruction op (with instruction_source: dataset, the fallback until the player sends a task).
        self.instruction = self.settings.instruction
        self._readiness_detail: dict[str, Any] | None = None  # what the readiness file says now
        self.needs_contract = True
        self.next_contract_check = 0.0
        self.next_request_at = 0.0
        self.auto_start_armed = self.settings.auto_start
        self.auto_start_due = False
        self.auto_start_waits = AutoStartWait(config) if self.settings.auto_start else None
        self.stats = LoopStats()
        self.clamping = False  # the last executed row was clamped (a clamped event per clamped stretch)
        self.policy_errors = 0  # policy_error events, and how many came in a row (for the back-off)
        self.policy_error_streak = 0
        self.latency = LatencyTracker(1.0 if self.settings.lockstep else config.fps, list(self.writers))

    def chunk_queued(self, job: Job) -> None:
        """A chunk's rows were just queued (real time: the ticks' phase follows it)."""

    # ------------------------------------------------------------------ lifecycle
    def timing(self) -> str:
        """How ticks are paced, for the start-up log line."""
        raise NotImplementedError

    def loop(self) -> None:
        """Run ticks until the stop event is set."""
        raise NotImplementedError

    def input_clock(self) -> float | None:
        """The time a capture stamp is checked against (ahead by more than ``actuator.max_future_s`` is
        refused), or None where stamps are not this clock's."""
        raise NotImplementedError

    def run(self) -> None:
        self.worker.start()
        for writer in self.writers.values():
            writer.start()
        log.info("actuator up: %d camera(s), %d arm(s), %s, %s, overlap=%s, refill %s, events %s, "
                 "control %s", len(self.config.cameras), len(self.config.arms),
                 "dry-run" if self.settings.dry_run else "writing to the bus",
                 self.timing(), self.settings.overlap,
                 "from the measured round trip" if self.settings.refill_rows is None
                 else f"at {self.settings.refill_rows} rows left", self.settings.events_endpoint,
                 self.settings.control_endpoint)
        try:
            self.loop()
        finally:
            if self.core.episodes.state == RUNNING:
                # A clean stop ends the episode on the record: the recorder saves it complete.
                record = self.core.stop("", reason="actuator_stopped")
                self._publish_episode("episode_stop", record, reason="actuator_stopped")
                time.sleep(0.1)  # let the event leave before the socket closes (linger 0)
            self.readiness.clear()
            self.worker.close()
            for writer in self.writers.values():
                writer.join(timeout=2.0)
            self.subscriber.close()
            self.events.close()
            self.control.close()
            log.info("actuator stopped after %d ticks", self.core.ticks)

    def service(self, timeout_s: float) -> None:
        """Take inputs, policy results and control requests for up to ``timeout_s``; what arrived is acted on
        at once (``on_results``, ``on_frames``), not at the next tick."""
        ready = dict(self.poller.poll(max(0, int(timeout_s * 1000))))
        self._publish_latency()
        if self.worker.wakeup_fd in ready:
            self.worker.drain_wakeups()
            self.on_results()
        if self.subscriber.sock in ready and self.ingest_inputs():
            self.on_frames()
        if self.control.sock in ready:
            while (request := self.control.receive(0.0)) is not None:
                self._handle_control(*request)

    def on_results(self) -> None:
        """Policy results landed between ticks (real time: handled now; lockstep: at its own tick)."""

    def on_frames(self) -> None:
        """New frames arrived between ticks (real time: a due request leaves now; lockstep: at its tick)."""

    def ingest_inputs(self) -> int:
        """Take every input that arrived since the last look, without waiting; returns how many were frames."""
        frames = 0
        for msg in self.subscriber.poll(0.0):
            self.inputs.ingest(msg, self.input_clock())
            frames += msg.kind == KIND_FRAME
        for refusal in self.inputs.refusals:
            self._publish_event("input_refused", **refusal)
        self.inputs.refusals.clear()
        for recovery in self.subscriber.take_reconnects():
            self._publish_event("reconnected", endpoint=recovery.endpoint, reason=recovery.reason)
        return frames

    # ------------------------------------------------------------------ the shared part of a tick
    def act(self, *, now: float, scheduled: float, lateness: float, input_problem: str,
            measured: np.ndarray | None, frame_index: int) -> None:
        """Decide this tick's target (the core, at time ``scheduled``), write it to the buses, publish it."""
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
            executed = not decision.hold and self.latency.executed(
                self.core.ticks, decision.obs_t, decision.row_t, time.monotonic(), self.core.episodes.episode_index)
            self._write(decision.target, tag=self.core.ticks if executed else None)
        if decision.hold and decision.reason != previous_reason:
            self.core.holds[decision.reason] += 1
            self._publish_event("hold", reason=decision.reason, count=self.core.holds[decision.reason],
                                message=decision.detail)
            level = logging.DEBUG if decision.reason == HOLD_IDLE else logging.INFO
            log.log(level, "hold: %s%s", decision.reason, f" ({decision.detail})" if decision.detail else "")
        elif decision.detail and decision.reason == HOLD_BAD_ACTION:
            log.warning("refused action row: %s", decision.detail)
        self._publish_action(decision, now, lateness, frame_index)

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

    def _write(self, target: np.ndarray, tag: int | None = None) -> None:
        if not np.all(np.isfinite(target)):
            return
        for index, writer in enumerate(self.writers.values()):
            writer.submit(target[index * JOINTS_PER_ARM:(index + 1) * JOINTS_PER_ARM], tag)

    def _publish_latency(self) -> None:
        """A ``latency`` event for every executed goal whose write returned on every arm."""
        for name, writer in self.writers.items():
            while writer.written:
                tick, written_t = writer.written.popleft()
                meta = self.latency.written(tick, name, written_t)
                if meta is not None:
                    self.events.publish(Message(kind=KIND_EVENT, meta=meta))

    # ------------------------------------------------------------------ policy results
    def take_results(self, now: float) -> None:
        """Handle every policy result that is ready; a chunk counts as arriving at ``now`` (core units)."""
        while (result := self.worker.take()) is not None:
            self.handle_result(result, now=now)

    def handle_result(self, result: JobResult, now: float) -> None:
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

    def current_instruction(self) -> str:
        """The instruction the next infer request carries ("" when there is none): the dataset player's task under
        ``instruction_source: dataset`` once one came, else ``actuator.instruction`` (or what the control socket
        set)."""
        if self.settings.instruction_source == "dataset" and self.inputs.task:
            return self.inputs.task
        return self.instruction

    def _instruction_differences(self, contract: PolicyContract) -> list[str]:
        """A language policy needs an instruction before it may move (with instruction_source: dataset, the
        player's task may still bring one, so only the request waits for it)."""
        if not contract.takes_instruction or self.instruction or self.settings.instruction_source == "dataset":
            return []
        return [f"instruction: the policy ({contract.policy_type}) takes a language instruction and "
                "actuator.instruction is empty: set actuator.instruction in the config (or "
                "--actuator.instruction='pick up the cube'), send the control socket's instruction op, or set "
                "actuator.instruction_source: dataset to use the dataset player's task"]

    def _contract_checked(self, contract: PolicyContract) -> None:
        differences = contract_differences(contract, self.config) + self._instruction_differences(contract)
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
        else:
            self._chunking_known(contract)
            if not was_ok:
                log.info("policy contract matches (%s %s, chunk %d, checkpoint %s%s)", contract.policy_type,
                         contract.device, contract.chunk_length, contract.checkpoint_id,
                         ", UNTRAINED" if contract.untrained else "")
                if self.auto_start_armed and self.core.episodes.state == IDLE:
                    self.auto_start_due = True  # started by maybe_auto_start once the programs it waits for are up
        if not self.contract_checked:
            self.contract_checked = True
            self._mark_ready()
        elif self.readiness.path.exists():
            self._mark_ready()  # a refusal that began or ended, or now differs: make status shows the current one

    def submit_infer(self, observation: Observation, obs_t: float, age: float, on_frame: bool = False) -> None:
        """Ask for the next chunk; under ``overlap: rtc`` with the rows that ran or will run meanwhile, and with the
        current instruction for a policy that takes one (none yet: no request, the loop holds saying why)."""
        instruction: str | None = None
        if self.contract is not None and self.contract.takes_instruction:
            instruction = self.current_instruction()
            if not instruction:
                self.core.on_policy_failure(HOLD_MISSING_INPUT, "no instruction yet: the dataset player's states carry "
                                            "no meta.task and actuator.instruction is empty")
                return
        prefix, delay = self.core.rtc_prefix(obs_t, age)
        self.worker.submit(Job("infer", self.core.generation, observation, obs_t=obs_t,
                               rtc_prefix=prefix, rtc_delay_rows=delay, instruction=instruction, on_frame=on_frame))

    def _chunking_known(self, contract: PolicyContract) -> None:
        """The contract's chunk length drives the refill; a refill_rows it cannot honour is said once."""
        rtc_rows = int(contract.extra.get("rtc_max_prefix_rows", 0) or 0)
        problem = self.core.set_chunk_rows(contract.chunk_length, rtc_rows)
        if problem:
            log.warning("%s", problem)
            self._publish_event("schedule", covered=True, round_trip_p90_s=-1.0, inference_p90_s=-1.0,
                                chunk_rows=contract.chunk_length, fps=float(self.config.fps), message=problem)

    def _round_trip_p90_s(self) -> float:
        measured = self.core.refill.round_trip()
        if measured is None:
            return -1.0
        return 0.0 if self.settings.lockstep else measured  # lockstep: frame time, the request is waited for

    def _schedule_notice(self, notice: CoverageNotice) -> None:
        """Said once per change: the round trip stopped (or started again) fitting inside a chunk."""
        if notice.covered:
            log.info("%s", notice.message)
        else:
            log.warning("%s", notice.message)
        self._publish_event("schedule", covered=notice.covered, round_trip_p90_s=notice.round_trip_s,
                            inference_p90_s=notice.inference_s, chunk_rows=notice.chunk_rows, fps=notice.fps,
                            message=notice.message)

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
        # The round trip is the client's one pair of instants (request sent, reply read), the same the latency
        # chain reports. Lockstep waits for the chunk before the tick: in frame time its round trip is 0.
        round_trip = 0.0 if self.settings.lockstep else reply.round_trip_s
        notice = self.core.on_round_trip(round_trip, reply.timings.get("total_s"))
        if notice is not None:
            self._schedule_notice(notice)
        try:
            result = self.core.on_chunk(reply.actions, float(job.obs_t), now, job.generation, reply.guide)
        except ValueError as exc:
            self._policy_error("infer", f"policy chunk unusable: {exc}")
            return
        if result is None:
            return
        if job.observation is not None and result.accepted:
            self.latency.chunk_queued(float(job.obs_t), job.observation.stamps, reply.sent_t, reply.received_t,
                                      time.monotonic(), reply.timings)
            self.chunk_queued(job)
        self.policy_error_streak = 0
        self._publish_event("chunk", arrays={"chunk": np.ascontiguousarray(reply.actions, dtype=np.float32)},
                            rows=result.rows, accepted=result.accepted, dropped_stale=result.dropped_stale,
                            blended=result.blended, replaced=result.replaced, obs_t=reply.obs_t, arrival_t=now,
                            round_trip_s=reply.round_trip_s, timings=reply.timings, batch=reply.batch,
                            queue_depth=self.core.queue.depth(now), refill_rows=self.core.refill.threshold(),
                            round_trip_p90_s=self._round_trip_p90_s(), rtc_delay_rows=job.rtc_delay_rows,
                            rtc_prefix_rows=0 if job.rtc_prefix is None else len(job.rtc_prefix))

    def maybe_auto_start(self, now: float) -> None:
        """Start the auto-start episode once the contract matched and the programs it waits for are ready."""
        if not self.auto_start_due or self.core.episodes.state != IDLE or not self.core.episodes.contract_ok:
            return
        # Real time: every camera and arm first, since a tick without them holds and cannot become a recorded
        # frame. Lockstep ticks only on a delivered observation, so there is nothing to lose by starting, and
        # a lockstep feeder (the player, offline evaluation) may wait for the episode before its first frame.
        if not self.settings.lockstep and not self.inputs.complete():
            return
        if self.auto_start_waits is not None and not self.auto_start_waits.done(now):
            return
        self.auto_start_due = False
        self._start_episode(None)

    def maybe_check_contract(self, now: float) -> None:
        if self.needs_contract and self.worker.pending == 0 and now >= self.next_contract_check:
            self.next_contract_check = now + CONTRACT_RECHECK_S
            self.worker.submit(Job("contract"))
        wait = self.settings.contract_wait_s
        if not self.contract_checked and wait > 0 and now - self.started_at > wait and not self.readiness.path.exists():
            log.warning("no contract from the policy at %s after %.1fs; ready, but refusing to start until it "
                        "answers", self.config.policy.endpoint, wait)
            self._mark_ready()
        self.maybe_auto_start(now)

    def _mark_ready(self) -> None:
        """Write the readiness file, or rewrite it when what it says changed. ``refusing`` (the generic key
        ``make status`` and the panel read): why this running node refuses to move, "" when it does not."""
        contract = "ok" if self.core.episodes.contract_ok else "mismatch" if self.contract_checked else "unchecked"
        differences = list(self.core.episodes.differences)
        refusing = ""
        if contract == "mismatch":
            refusing = "refuses to move: the policy's contract does not match the config: " + "; ".join(differences)
        elif contract == "unchecked":
            refusing = f"refuses to start: no contract from the policy at {self.config.policy.endpoint} yet"
        detail = {"contract": contract, "differences": differences, "refusing": refusing,
                  "dry_run": self.settings.dry_run, "lockstep": self.settings.lockstep}
        if detail == self._readiness_detail:
            return
        self._readiness_detail = detail
        self.readiness.ready(**detail)

    def _start_episode(self, episode_index: object) -> EpisodeRecord:
        record = self.core.start(episode_index)
        for writer in self.writers.values():
            writer.request_present(self.core.generation)  # the new episode's step limit starts there
        # A fresh policy session per episode: DiffusionPolicy keeps observation history per client.
        self.worker.submit(Job("reset", self.core.generation))
        self._publish_episode("episode_start", record, reason="start", instruction=self.current_instruction())
        log.info("episode %d started", record.index)
        return record

    # ------------------------------------------------------------------ publishing
    def _publish_action(self, decision: TickDecision, now: float, lateness: float, frame_index: int) -> None:
        meta = {"role": "executed", "names": self.core.names, "tick": self.core.ticks, "hold": decision.hold,
                "hold_reason": decision.reason if decision.hold else "",
                "episode_index": self.core.episodes.episode_index, "obs_t": decision.obs_t, "row_t": decision.row_t,
                "inputs": self.inputs.input_seqs(),
                "frame_index": frame_index,
                "queue_depth": len(self.core.queue), "lateness_s": lateness, "dry_run": self.settings.dry_run}
        record = self.core.episodes.active
        if record is not None:
            # The recorder keys episodes by episode_id and counts the episode_tick numbers it never saw.
            meta.update(episode_id=record.uid, episode_tick=record.ticks)
            record.ticks += 1
        self.events.publish(Message(kind=KIND_ACTION, t=now, meta=meta, arrays={"action": decision.target}))

    def _publish_event(self, event: str, arrays: dict[str, np.ndarray] | None = None, **meta: Any) -> None:
        self.events.publish(Message(kind=KIND_EVENT, meta={"event": event, **meta}, arrays=arrays or {}))

    def _publish_episode(self, event: str, record: EpisodeRecord, reason: str, **extra: Any) -> None:
        self._publish_event(event, episode_index=record.index, episode_id=record.uid, label=record.label,
                            reason=reason, ticks=record.ticks, **extra)

    def maybe_report(self) -> None:
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
                            reconnects=self.subscriber.reconnect_count, refill_rows=self.core.refill.threshold(),
                            round_trip_p90_s=self._round_trip_p90_s())
