"""The actuator node: the control loop between the sensors, the policy and the servo bus.

Each tick (``config.fps`` on the monotonic clock, or once per new observation in lockstep) it:

1. drains the newest frame of every camera and the newest state of every arm;
2. decides hold or act: stale or missing inputs, no episode, a refused contract, an unreachable or
   failing policy, an empty queue, stale rows or a corrupt row all mean *hold the last commanded target*;
3. when acting, pops the queued row meant for this tick (``nodes.actuator.chunk_queue``) and passes it through the
   safety filter (``nodes.actuator.safety``: joint limits, max step per tick);
4. writes the target to each arm's bus (unless ``actuator.dry_run``) and publishes one ``action`` message;
5. asks the policy for the next chunk when the rows left cover the measured round trip (a running p90;
   ``actuator.refill_rows`` overrides it; with ``overlap: rtc`` the request carries the rows that will
   still run meanwhile), in a worker thread
   so inference overlaps execution.

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
from nodes.actuator.core import HOLD_MISSING_INPUT, ControlCore
from nodes.actuator.episodes import RUNNING
from nodes.actuator.node import ActuatorNode
from nodes.actuator.workers import Job

log = logging.getLogger("actuator")


class RealtimeLoop(ActuatorNode):
    """Ticks at ``config.fps`` on the monotonic clock; the next chunk is asked for in the background."""

    def __init__(self, config: DeploymentConfig, stop: threading.Event, readiness: Readiness,
                 curve: CurveKeys | None = None) -> None:
        super().__init__(config, stop, ControlCore(config), readiness, curve)

    def timing(self) -> str:
        return f"{self.config.fps} Hz"

    def input_clock(self) -> float | None:
        return time.monotonic()

    def loop(self) -> None:
        deadline = time.monotonic()
        while not self.stop_event.is_set():
            self._wait_until(deadline)
            started = time.monotonic()
            lateness = started - deadline
            self.tick(now=started, scheduled=deadline, lateness=lateness)
            deadline += self.period
            behind = time.monotonic() - deadline
            if behind > self.period:
                # Whole ticks were missed: skip them rather than run a burst of late ticks.
                skipped = int(behind // self.period)
                self.stats.missed_ticks += skipped
                deadline += skipped * self.period

    def tick(self, *, now: float, scheduled: float, lateness: float) -> None:
        self.ingest_inputs()
        self.take_results(now)
        self.maybe_check_contract(now)
        input_problem = self.inputs.problem(now)
        self.act(now=now, scheduled=scheduled, lateness=lateness, input_problem=input_problem,
                 measured=self.inputs.measured(), frame_index=self.inputs.frame_index())
        if (not input_problem and not self.needs_contract and self.worker.pending == 0
                and now >= self.next_request_at and self.core.wants_chunk(scheduled)):
            observation = self.inputs.observation()
            self.submit_infer(observation, observation.obs_t, age=now - observation.obs_t)
        self.stats.window.append(lateness)
        self.maybe_report()

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
