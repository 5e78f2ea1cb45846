"""The actuator node: the control loop between the sensors, the policy and the servo bus.

Each tick (``config.fps`` on the monotonic clock, phase-locked to the replies by ``nodes.actuator.pacer``, or once
per new observation in lockstep) it:

1. drains the newest frame of every camera and the newest state of every arm;
2. decides hold or act: stale or missing inputs, no episode, a refused contract, an unreachable or
   failing policy, an empty queue, stale rows or a corrupt row all mean *hold the last commanded target*;
3. when acting, pops the queued row meant for this tick (``nodes.actuator.chunk_queue``) and passes it through the
   safety filter (``nodes.actuator.safety``: joint limits, max step per tick);
4. writes the target to each arm's bus (unless ``actuator.dry_run``) and publishes one ``action`` message;
5. asks the policy for the next chunk when the rows left cover the measured round trip (a running p90;
   ``actuator.refill_rows`` overrides it; with ``overlap: rtc`` the request carries the rows that will
   still run meanwhile), in a worker thread so inference overlaps execution. In real time a due request
   leaves when its frames land and a reply is queued when it lands, between ticks (``RealtimeLoop``).

The room: ``core`` (``ControlCore``, the decisions and hold reasons: pure logic, no sockets, the property
tests drive it directly), ``inputs`` (the newest frame and state, validated), ``workers`` (the policy
worker and the bus writers), ``node`` (``ActuatorNode``: sockets, policy results, control socket,
publishing), ``chunk_queue``, ``safety``, ``episodes``; this module holds the two loops over them. It
may import ``common`` and its own room. The message contract is in
docs (streams): ``action`` per tick, ``hold``/``chunk``/``episode_*``/``loop_stats``/``contract_mismatch`` events.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time

import numpy as np

from common.config import DeploymentConfig
from common.node import Readiness, start_node
from common.wire.curve import CurveKeys
from nodes.actuator import PROGRAM
from nodes.actuator.core import ControlCore
from nodes.actuator.episodes import RUNNING
from nodes.actuator.holds import HOLD_MISSING_INPUT
from nodes.actuator.node import ActuatorNode
from nodes.actuator.pacer import MAX_SHIFT, MIN_GAP, PhaseLockedPacer
from nodes.actuator.workers import Job

log = logging.getLogger("actuator")


class RealtimeLoop(ActuatorNode):
    """One goal per period at ``config.fps``, acting when the data arrives (issue 23): a due request leaves when
    a frame lands, a reply is checked and queued when it lands, and the ticks' phase follows the replies
    (``nodes.actuator.pacer``: the tick executing a new chunk's first usable row comes right after it lands)."""

    def __init__(self, config: DeploymentConfig, stop: threading.Event, readiness: Readiness,
                 curve: CurveKeys | None = None) -> None:
        super().__init__(config, stop, ControlCore(config), readiness, curve)
        self.pacer = PhaseLockedPacer(self.period)
        self.last_frame_at: float | None = None  # when the last frame landed, and the frames' running spacing
        self.frame_interval = self.period
        self.due_since: float | None = None  # when the pending request became due (it waits for a fresh frame)

    def timing(self) -> str:
        return f"{self.config.fps} Hz, phase-locked to the replies"

    def input_clock(self) -> float | None:
        return time.monotonic()

    def loop(self) -> None:
        self.pacer.start(time.monotonic())
        while not self.stop_event.is_set():
            self._wait_until_tick()
            started = time.monotonic()
            deadline = self.pacer.deadline
            self.tick(now=started, scheduled=deadline, lateness=started - deadline)
            self.stats.missed_ticks += self.pacer.advance(time.monotonic(), started=started)

    def tick(self, *, now: float, scheduled: float, lateness: float) -> None:
        self.ingest_inputs()
        self.take_results()
        self.maybe_check_contract(now)
        input_problem = self.inputs.problem(now)
        # Only a tick the pacer moved early takes the next row ahead of its slot (instead of holding for it).
        self.core.queue.lookahead = MAX_SHIFT * self.period if scheduled < self.pacer.nominal - 1e-6 else 0.0
        self.act(now=now, scheduled=scheduled, lateness=lateness, input_problem=input_problem,
                 measured=self.inputs.measured(), frame_index=self.inputs.frame_index())
        # A request due now waits for the next frame when one is expected before the next tick, once: frames
        # slower than the ticks, none coming or never a fresh set do not starve the queue (it leaves now).
        waited = self.due_since is not None and self.due_since <= now - self.period
        expected = self.last_frame_at is not None and self.last_frame_at + self.frame_interval < scheduled + self.period
        if waited or not expected:
            self._maybe_request(now, scheduled + self.period)
        self.stats.window.append(lateness)
        self.maybe_report()

    def take_results(self, now: float | None = None) -> None:
        """Every policy result that is ready, handled now: a chunk counts as arriving when it is taken."""
        while (result := self.worker.take()) is not None:
            self.handle_result(result, now=time.monotonic() if now is None else now)

    def on_results(self) -> None:
        self.take_results()

    def chunk_queued(self, job: Job) -> None:
        # Only a reply to a request that left with its frames sets the phase: one sent at a tick (the frames were
        # late) lands at that tick's phase plus the round trip, and following it would chase the loop's own tail.
        if job.on_frame:
            self.pacer.arrived(time.monotonic())

    def on_frames(self) -> None:
        """A frame landed: if a request is due (the rows left at the next tick cover no more than the round
        trip) and the frames are now fresh (the oldest younger than ``MIN_GAP`` of a period: with cameras in
        step, the set is complete), the request leaves now with them, not at the next tick."""
        now = time.monotonic()
        if self.last_frame_at is not None:
            self.frame_interval += 0.2 * (now - self.last_frame_at - self.frame_interval)
        self.last_frame_at = now
        self._maybe_request(now, self.pacer.deadline, fresh_within=MIN_GAP * self.period)

    def _maybe_request(self, now: float, next_tick: float, fresh_within: float = math.inf) -> None:
        if (self.needs_contract or self.worker.pending != 0 or now < self.next_request_at
                or self.inputs.problem(now) or not self.core.wants_chunk(next_tick)):
            self.due_since = None
            return
        if self.due_since is None:
            self.due_since = now
        if now - min(msg.t for msg in self.inputs.frames.values()) >= fresh_within:
            return
        self.due_since = None
        observation = self.inputs.observation()
        self.submit_infer(observation, observation.obs_t, age=now - observation.obs_t, on_frame=fresh_within < math.inf)

    def _wait_until_tick(self) -> None:
        """Serve inputs, results and control requests until the next deadline (which a landing reply may move;
        zmq polls in ms, the rest is a short sleep)."""
        while not self.stop_event.is_set():
            remaining = self.pacer.deadline - time.monotonic()
            if remaining <= 0:
                return
            if remaining < 0.002:
                # zmq polls in whole milliseconds: finish with a plain sleep, which is finer.
                time.sleep(remaining)
                return
            self.service(timeout_s=remaining - 0.001)


class LockstepLoop(ActuatorNode):
    """Ticks once per new complete observation (the dataset player's frames); time is the frame index.

    Each tick asks for a chunk from this very observation and waits for it, so a slow policy slows the
    replay instead of dropping rows (row j of a chunk from frame i runs at frame i + j; a chunk is never
    too old because it is requested for the very frame it runs on).
    """

    def __init__(self, config: DeploymentConfig, stop: threading.Event, readiness: Readiness,
                 curve: CurveKeys | None = None) -> None:
        super().__init__(config, stop, ControlCore(config, period=1.0, max_chunk_age=math.inf, lockstep=True),
                         readiness, curve)
        self.last_t: dict[str, float] = {}  # per camera and arm: the capture time used at the last tick
        self.key = -1  # the current tick's frame index

    def timing(self) -> str:
        return "lockstep"

    def input_clock(self) -> float | None:
        return None  # the stamps are the player's; ages are not checked here, so neither is the future

    def loop(self) -> None:
        while not self.stop_event.is_set():
            self.service(timeout_s=0.02)
            # The contract check and episode start must not wait for the first observation: the player
            # may wait for the actuator to be ready before it publishes anything.
            self.take_results(float(self.key))
            self.maybe_check_contract(time.monotonic())
            if self._new_complete_observation():
                self.tick(now=time.monotonic(), scheduled=float(self.key))
            self.maybe_report()

    def tick(self, *, now: float, scheduled: float) -> None:
        self.ingest_inputs()
        self.take_results(scheduled)
        self.maybe_check_contract(now)
        input_problem = "" if self.inputs.complete() else HOLD_MISSING_INPUT
        measured = self.inputs.measured()
        if not input_problem and not self.needs_contract:
            self._refill(scheduled, measured)
        self.act(now=now, scheduled=scheduled, lateness=0.0, input_problem=input_problem, measured=measured,
                 frame_index=self.key)
        self.stats.window.append(0.0)
        self.maybe_report()

    def _refill(self, key: float, measured: np.ndarray | None) -> None:
        """Ask for a chunk from this very observation and wait for it before the tick runs."""
        core = self.core
        if core.episodes.state != RUNNING or not core.episodes.contract_ok:
            return
        anchor = self._servo_position() if self.writers else measured  # the servos, as in real time
        if not core.safety.anchored and anchor is not None:
            core.safety.anchor(anchor)
        if not core.wants_chunk(key):
            return
        self.submit_infer(self.inputs.observation(), key, age=0.0)
        deadline = time.monotonic() + self.config.policy.timeout_s * max(1, self.config.policy.retries) + 1.0
        while self.worker.pending and time.monotonic() < deadline and not self.stop_event.is_set():
            result = self.worker.take(timeout_s=0.05)
            if result is not None:
                self.handle_result(result, now=key)

    def _new_complete_observation(self) -> bool:
        """True once every camera and arm delivered a message newer than the ones used at the last tick."""
        if not self.inputs.complete():
            return False
        parts = {**self.inputs.frames, **self.inputs.states}
        if any(msg.t <= self.last_t.get(name, -math.inf) for name, msg in parts.items()):
            return False
        self.last_t = {name: msg.t for name, msg in parts.items()}
        index = self.inputs.frame_index()
        key = index if index >= 0 else self.key + 1
        if key < self.key:
            # The player went back (a new dataset episode): the queued rows and the policy's history are void.
            self.core.queue.clear()
            if self.core.episodes.state == RUNNING:
                self.worker.submit(Job("reset", self.core.generation))
        self.key = key
        return True


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
    started = start_node(PROGRAM, "armpipe actuator: the control loop (policy chunks -> safe goal positions)", argv,
                         curve_side="client")
    set_priority(started.config.actuator.nice)
    loop = LockstepLoop if started.config.actuator.lockstep else RealtimeLoop
    loop(started.config, started.stop, started.readiness, started.curve).run()


if __name__ == "__main__":
    main()
