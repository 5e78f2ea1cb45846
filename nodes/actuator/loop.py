"""The actuator's control loop: one ``run()`` over an injected pacer (``nodes.actuator.pacer``: real time,
phase-locked to the replies; or lockstep, a tick per dataset frame). Between ticks it serves what lands (a due
request leaves when its frames land, a reply is checked and queued when it lands, control requests are
answered); each tick takes its inputs, decides with the core and acts (bus writes, the ``action`` message).

What it is given: the core (``ControlCore``, every decision), the inputs (``InputBook``), the policy link
(``PolicyLink``: contract, requests, results), the buses (``Buses``), the events publisher (``EventStream``) and
the control handler (``ControlHandler``), built here from the config and the pacer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import zmq

from common.config import DeploymentConfig
from common.node import Readiness
from common.streams import sensor_endpoints
from common.wire.curve import CurveKeys
from common.wire.protocol import KIND_FRAME
from common.wire.transport import LatestSubscriber, Publisher, RouterServer, SocketFactory
from nodes.actuator import PROGRAM
from nodes.actuator.backlog import Backlog
from nodes.actuator.bus_writer import Buses
from nodes.actuator.control import ControlHandler
from nodes.actuator.core import TickDecision
from nodes.actuator.episodes import RUNNING, EpisodeRecord
from nodes.actuator.holds import HOLD_BAD_ACTION, HOLD_BUS_ERROR, HOLD_IDLE
from nodes.actuator.inputs import InputBook
from nodes.actuator.latency import LatencyTracker
from nodes.actuator.pacer import MAX_SHIFT, MIN_GAP, LockstepPacer, RealtimePacer, Tick
from nodes.actuator.policy_link import PolicyLink
from nodes.actuator.policy_worker import Job, PolicyWorker
from nodes.actuator.publishing import EVENTS_HWM, EventStream, LoopStats

log = logging.getLogger("actuator")


class Actuator:
    """The control loop and what it is wired to (sockets, worker threads, core), built from the config."""

    def __init__(self, config: DeploymentConfig, stop: threading.Event, readiness: Readiness,
                 pacer: RealtimePacer | LockstepPacer, curve: CurveKeys | None = None) -> None:
        self.config, self.settings, self.stop_event, self.pacer = config, config.actuator, stop, pacer
        self.period = 1.0 / config.fps
        self.core = pacer.new_core(config)
        self.inputs = InputBook(config)
        self.factory = SocketFactory()
        self.subscriber = LatestSubscriber(self.factory, sensor_endpoints(config))
        # Everything published is also kept a while for a recorder restarted mid-episode (the control socket's
        # backlog op; nodes/actuator/backlog.py): the small streams it missed, filled in when it resumes.
        self.backlog = Backlog(config.fps, lambda: self.inputs.measured(),
                               lambda: self.core.episodes.active.uid if self.core.episodes.active else "")
        publisher = Publisher(self.factory, self.settings.events_endpoint, PROGRAM, hwm=EVENTS_HWM)
        self.events = EventStream(self.backlog.wrap(publisher), self.core, self.inputs, self.settings.dry_run)
        # The policy link may cross hosts (CURVE, common.wire.curve); every other socket here is loopback.
        self.worker = PolicyWorker(SocketFactory(curve=curve) if curve is not None else self.factory, config,
                                   f"actuator-{config.task}-{uuid.uuid4().hex[:8]}")
        self.buses = Buses(config, stop, self.settings.dry_run)
        self.latency = LatencyTracker(1.0 if pacer.lockstep else config.fps, list(self.buses.writers))
        self.policy = PolicyLink(config, self.core, self.worker, self.inputs, self.events, self.latency, readiness,
                                 start_episode=self.start_episode, on_chunk_queued=self._chunk_queued)
        self.control = ControlHandler(RouterServer(self.factory, self.settings.control_endpoint), config, self.core,
                                      start_episode=self.start_episode, policy=self.policy, backlog=self.backlog,
                                      buses=self.buses, events=self.events)
        self.poller = zmq.Poller()
        self.poller.register(self.subscriber.sock, zmq.POLLIN)
        self.poller.register(self.control.control.sock, zmq.POLLIN)
        self.poller.register(self.worker.wakeup_fd, zmq.POLLIN)  # a policy result landed
        self.readiness = readiness
        self.stats = LoopStats()
        self.clamping = False  # the last executed row was clamped (a clamped event per clamped stretch)
        self.last_frame_at: float | None = None  # real time: when the last frame landed, and the frames' spacing
        self.frame_interval = self.period
        self.due_since: float | None = None  # when the pending request became due (it waits for a fresh frame)

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        """Wait for the pacer's next tick (serving what lands meanwhile), then inputs, decide, act."""
        with self.running():
            while not self.stop_event.is_set():
                tick = self.pacer.next_tick(self.serve, self.stop_event, self.inputs)
                if tick is not None and tick.rewound:
                    self.rewind()
                # Inputs: the newest frames and states, the policy's results, its contract (and the auto-start).
                self.take_inputs()
                self.take_results()
                self.policy.check_contract(time.monotonic())
                if tick is not None:
                    problem = self.inputs.problem(None if self.pacer.lockstep else tick.now)
                    if self.pacer.lockstep and not problem and not self.policy.needs_contract:
                        self.fetch_chunk(tick.key)  # lockstep: the chunk for this very observation, waited for
                    # Decide and act. Only a tick the pacer moved early takes the next row ahead of its slot.
                    self.core.queue.lookahead = MAX_SHIFT * self.period if tick.early else 0.0
                    self.act(tick, problem)
                    if not self.pacer.lockstep:
                        self.request_at_tick(tick)
                    self.stats.window.append(tick.lateness)
                    self.pacer.done(tick)
                self.report()

    def serve(self, timeout_s: float) -> None:
        """Take inputs, policy results and control requests for up to ``timeout_s``; what arrived is acted on at
        once (a reply queued, a due request sent with the frames that landed), not at the next tick."""
        ready = dict(self.poller.poll(max(0, int(timeout_s * 1000))))
        self.events.latency(self.buses.written(), self.latency)
        if self.worker.wakeup_fd in ready:
            self.worker.drain_wakeups()
            self.take_results()
        if self.subscriber.sock in ready and self.take_inputs() and not self.pacer.lockstep:
            self.frames_landed()
        if self.control.control.sock in ready:
            self.control.serve()

    def take_inputs(self) -> int:
        """Take every input that arrived since the last look, without waiting; returns how many were frames."""
        frames = 0
        for msg in self.subscriber.poll(0.0):
            self.inputs.ingest(msg, self.pacer.input_clock())
            frames += msg.kind == KIND_FRAME
        for refusal in self.inputs.refusals:
            self.events.event("input_refused", **refusal)
        self.inputs.refusals.clear()
        for recovery in self.subscriber.take_reconnects():
            self.events.event("reconnected", endpoint=recovery.endpoint, reason=recovery.reason)
        return frames

    def take_results(self) -> None:
        """Every policy result that is ready, handled now: a chunk counts as arriving when it is taken."""
        while (result := self.worker.take()) is not None:
            self.policy.handle_result(result, now=self.pacer.clock())

    def _chunk_queued(self, job: Job) -> None:
        # Only a reply to a request that left with its frames sets the phase: one sent at a tick (the frames were
        # late) lands at that tick's phase plus the round trip, and following it would chase the loop's own tail.
        if job.on_frame:
            self.pacer.arrived(time.monotonic())

    # ------------------------------------------------------------------ act
    def act(self, tick: Tick, problem: str) -> None:
        """Decide this tick's target (the core, at the tick's time), write it to the buses, publish it."""
        core, measured = self.core, self.inputs.measured()
        previous_reason, was_anchored, broken = core.hold_reason, core.safety.anchored, self.buses.broken()
        servo_position = self.buses.position(core.generation)
        decision = core.tick(tick.key, problem, measured, HOLD_BUS_ERROR if broken else "",
                             servo_position=servo_position, anchor_on_servos=bool(self.buses))
        if decision.reason == HOLD_BUS_ERROR:
            decision.detail = broken
        if not was_anchored and core.safety.anchored and self.buses:
            self._anchored_on_servos(servo_position, measured)
        if decision.clamped and not self.clamping:
            self.events.event("clamped", joints=decision.clamped, count=core.clamped_rows)
            log.warning("policy row outside the joint limits for %s: clamped", decision.clamped)
        self.clamping = bool(decision.clamped)
        if decision.write and self.buses:
            executed = not decision.hold and self.latency.executed(
                core.ticks, decision.obs_t, decision.row_t, time.monotonic(), core.episodes.episode_index)
            self.buses.write(decision.target, tag=core.ticks if executed else None)
        self._say_hold(decision, previous_reason)
        frame_index = self.inputs.frame_index() if tick.frame_index is None else tick.frame_index
        self.events.action(decision, tick.now, tick.lateness, frame_index)

    def _say_hold(self, decision: TickDecision, previous_reason: str | None) -> None:
        if decision.hold and decision.reason != previous_reason:
            self.core.holds[decision.reason] += 1
            self.events.event("hold", reason=decision.reason, count=self.core.holds[decision.reason],
                              message=decision.detail)
            level = logging.DEBUG if decision.reason == HOLD_IDLE else logging.INFO
            log.log(level, "hold: %s%s", decision.reason, f" ({decision.detail})" if decision.detail else "")
        elif decision.detail and decision.reason == HOLD_BAD_ACTION:
            log.warning("refused action row: %s", decision.detail)

    def _anchored_on_servos(self, servo: np.ndarray | None, measured: np.ndarray | None) -> None:
        if servo is None or measured is None:
            return
        far = np.flatnonzero(np.abs(servo - measured) > self.settings.anchor_tolerance)
        if not far.size:
            return
        self.core.slow_start = True
        log.warning("episode start: the servos are away from the subscribed state by more than %g for %s; moving "
                    "slowly (rest_step) towards the policy's first target", self.settings.anchor_tolerance,
                    {self.core.names[i]: (float(servo[i]), float(measured[i])) for i in far})
        self.events.event("anchor_mismatch", joints=[self.core.names[i] for i in far], servo=servo.tolist(),
                          state=measured.tolist(), tolerance=self.settings.anchor_tolerance)

    # ------------------------------------------------------------------ when a request leaves
    def frames_landed(self) -> None:
        """Real time: a frame landed. If a request is due (the rows left at the next tick cover no more than the
        round trip) and the frames are now fresh (the oldest younger than ``MIN_GAP`` of a period: with cameras in
        step, the set is complete), the request leaves now with them, not at the next tick."""
        now = time.monotonic()
        if self.last_frame_at is not None:
            self.frame_interval += 0.2 * (now - self.last_frame_at - self.frame_interval)
        self.last_frame_at = now
        self._maybe_request(now, self.pacer.deadline, fresh_within=MIN_GAP * self.period)

    def request_at_tick(self, tick: Tick) -> None:
        """Real time: a request due now waits for the next frame when one is expected before the next tick, once:
        frames slower than the ticks, none coming or never a fresh set do not starve the queue (it leaves now)."""
        waited = self.due_since is not None and self.due_since <= tick.now - self.period
        expected = (self.last_frame_at is not None
                    and self.last_frame_at + self.frame_interval < tick.key + self.period)
        if waited or not expected:
            self._maybe_request(tick.now, tick.key + self.period)

    def _maybe_request(self, now: float, next_tick: float, fresh_within: float = math.inf) -> None:
        if (self.policy.needs_contract or self.worker.pending != 0 or now < self.policy.next_request_at
                or self.inputs.problem(now) or not self.core.wants_chunk(next_tick)):
            self.due_since = None
            return
        if self.due_since is None:
            self.due_since = now
        if now - min(msg.t for msg in self.inputs.frames.values()) >= fresh_within:
            return
        self.due_since = None
        observation = self.inputs.observation()
        self.policy.submit_infer(observation, observation.obs_t, age=now - observation.obs_t,
                                 on_frame=fresh_within < math.inf)

    def fetch_chunk(self, key: float) -> None:
        """Lockstep: ask for a chunk from this very observation and wait for it before the tick runs."""
        core = self.core
        if core.episodes.state != RUNNING or not core.episodes.contract_ok:
            return
        anchor = self.buses.position(core.generation) if self.buses else self.inputs.measured()  # as in real time
        if not core.safety.anchored and anchor is not None:
            core.safety.anchor(anchor)
        if not core.wants_chunk(key):
            return
        self.policy.submit_infer(self.inputs.observation(), key, age=0.0)
        deadline = time.monotonic() + self.config.policy.timeout_s * max(1, self.config.policy.retries) + 1.0
        while self.worker.pending and time.monotonic() < deadline and not self.stop_event.is_set():
            result = self.worker.take(timeout_s=0.05)
            if result is not None:
                self.policy.handle_result(result, now=key)

    def rewind(self) -> None:
        """Lockstep: the player went back (a new dataset episode): the queued rows and the policy's history are
        void."""
        self.core.queue.clear()
        if self.core.episodes.state == RUNNING:
            self.worker.submit(Job("reset", self.core.generation))

    # ------------------------------------------------------------------ episodes, reports, lifecycle
    def start_episode(self, episode_index: object) -> EpisodeRecord:
        record = self.core.start(episode_index)
        self.buses.request_present(self.core.generation)  # the new episode's step limit starts there
        # A fresh policy session per episode: DiffusionPolicy keeps observation history per client.
        self.worker.submit(Job("reset", self.core.generation))
        self.events.episode("episode_start", record, reason="start", instruction=self.policy.current_instruction())
        log.info("episode %d started", record.index)
        return record

    def report(self) -> None:
        """A ``loop_stats`` event once a second."""
        now = time.monotonic()
        if now - self.stats.last_report < 1.0:
            return
        self.stats.last_report = now
        p50, p99 = self.stats.percentiles()
        self.stats.window.clear()
        core = self.core
        self.events.event("loop_stats", lateness_p50_s=p50, lateness_p99_s=p99, ticks=core.ticks,
                          holds=dict(core.holds), queue_depth=len(core.queue), state=core.episodes.public_state,
                          contract_ok=core.episodes.contract_ok, missed_ticks=self.pacer.missed,
                          bad_inputs=self.inputs.bad_inputs, hold_reason=core.hold_reason or "",
                          clamped_rows=core.clamped_rows, policy_errors=self.policy.policy_errors,
                          refused_future=self.inputs.refused_future, reconnects=self.subscriber.reconnect_count,
                          refill_rows=core.refill.threshold(), round_trip_p90_s=self.policy.round_trip_p90_s())

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """The worker threads for the loop's lifetime; a clean stop ends a running episode on the record."""
        self.worker.start()
        self.buses.start()
        log.info("actuator up: %d camera(s), %d arm(s), %s, %s, overlap=%s, refill %s, events %s, control %s",
                 len(self.config.cameras), len(self.config.arms),
                 "dry-run" if self.settings.dry_run else "writing to the bus", self.pacer.timing,
                 self.settings.overlap, "from the measured round trip" if self.settings.refill_rows is None
                 else f"at {self.settings.refill_rows} rows left", self.settings.events_endpoint,
                 self.settings.control_endpoint)
        try:
            yield
        finally:
            if self.core.episodes.state == RUNNING:
                # A clean stop ends the episode on the record: the recorder saves it complete.
                record = self.core.stop("", reason="actuator_stopped")
                self.events.episode("episode_stop", record, reason="actuator_stopped")
                time.sleep(0.1)  # let the event leave before the socket closes (linger 0)
            self.readiness.clear()
            self.worker.close()
            self.buses.join(timeout_s=2.0)
            self.subscriber.close()
            self.events.close()
            self.control.control.close()
            log.info("actuator stopped after %d ticks", self.core.ticks)
