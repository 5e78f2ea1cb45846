"""The actuator's decisions, with no sockets: episode state, queued rows, safety filter and hold reasons.

``ControlCore.tick`` decides one tick's target from the inputs' problem, the measured position and the bus
health; the control loop (``nodes.actuator.loop``) drives it in either pacer's time units, and the
property tests drive it directly. Times are in the chunk queue's units: seconds of the robot's monotonic
clock, or frame indices in lockstep (``period=1``).
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

import numpy as np

from common.config import DeploymentConfig
from nodes.actuator.chunk_queue import ChunkQueue, InsertResult
from nodes.actuator.episodes import RUNNING, STOPPING, EpisodeRecord, Episodes
from nodes.actuator.holds import (
    HOLD_ALL_ROWS_STALE,
    HOLD_BAD_ACTION,
    HOLD_CONTRACT_MISMATCH,
    HOLD_IDLE,
    HOLD_MISSING_INPUT,
    HOLD_POLICY_UNREACHABLE,
    HOLD_QUEUE_EMPTY,
    HOLD_STOPPED,
)
from nodes.actuator.refill import CoverageNotice, RefillPlanner
from nodes.actuator.safety import SafetyFilter

REST_REACHED_TOLERANCE = 1e-3
JOINTS_PER_ARM = 6


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
                 max_chunk_age: float | None = None, lockstep: bool = False) -> None:
        settings = config.actuator
        self.names = config.action_names()
        self.dim = len(self.names)
        self.period = period if period is not None else 1.0 / config.fps
        self.queue = ChunkQueue(self.period, settings.overlap, settings.blend_old_weight, action_dim=self.dim)
        self.safety = SafetyFilter(config.lower_limits(), config.upper_limits(), config.max_step(), self.names)
        self.episodes = Episodes()
        # When to ask for the next chunk: rows left covering the measured round trip (lockstep: the request
        # waits for its chunk, so no margin row), or actuator.refill_rows.
        self.refill = RefillPlanner(self.period, config.fps, override=settings.refill_rows,
                                    margin_rows=0 if lockstep else 1)
        self.overlap = settings.overlap
        self.rtc_soft_rows = settings.rtc_soft_rows
        self.rtc_max_rows = 0  # from the contract: the longest prefix the policy continues
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
    def on_chunk(self, actions: np.ndarray, obs_t: float, now: float, generation: int,
                 guide: np.ndarray | None = None) -> InsertResult | None:
        """Queue a chunk that arrived at ``now``; None if it belongs to an episode that is over. ``guide``: the
        rows the policy predicted after the chunk (rtc only: they extend the next request's prefix)."""
        if generation != self.generation or self.episodes.state != RUNNING:
            return None
        self.policy_problem = self.policy_message = ""
        if now - obs_t > self.max_chunk_age:
            # Too old as a whole (actuator.max_chunk_age_s): nothing of it may run.
            self.last_chunk_all_stale = True
            return InsertResult(rows=len(actions), accepted=0, dropped_stale=len(actions), blended=0,
                                replaced=0)
        result = self.queue.insert(actions, obs_t, now, guide if self.overlap == "rtc" else None)
        self.last_chunk_all_stale = result.accepted == 0
        return result

    def on_policy_failure(self, reason: str, message: str) -> None:
        self.policy_problem = reason
        self.policy_message = message

    def wants_chunk(self, now: float) -> bool:
        """Whether the next chunk should be requested now (an episode runs and the queue runs low)."""
        return (self.episodes.state == RUNNING and self.episodes.contract_ok and self.safety.anchored
                and self.queue.depth(now) <= self.refill.threshold())

    def set_chunk_rows(self, rows: int, rtc_max_rows: int) -> str:
        """The policy's chunk length and rtc prefix limit (from its contract); returns a one-time complaint
        when ``refill_rows`` cannot be honoured with that chunk."""
        self.refill.set_chunk_rows(rows)
        self.rtc_max_rows = rtc_max_rows
        # rtc asks rtc_soft_rows earlier, so each request carries that many queued rows to continue softly.
        self.refill.overlap_rows = self.rtc_soft_rows if self.overlap == "rtc" and rtc_max_rows > 0 else 0
        return self.refill.override_problem()

    def on_round_trip(self, round_trip: float, inference_s: float | None) -> CoverageNotice | None:
        """A chunk's measured round trip (request sent to chunk in hand, queue time units)."""
        return self.refill.record(round_trip, inference_s)

    def rtc_prefix(self, obs_t: float, observation_age: float) -> tuple[np.ndarray | None, int]:
        """(prefix rows, frozen rows) for a request from the observation at ``obs_t`` under ``overlap: rtc``:
        the rows that ran or will run from ``obs_t`` on, the first ``delay`` of them before the reply is taken."""
        if self.overlap != "rtc" or self.rtc_max_rows <= 0:
            return None, 0
        delay = self.refill.delay_rows(observation_age)
        prefix = self.queue.prefix(obs_t, min(delay + self.rtc_soft_rows, self.rtc_max_rows))
        return (prefix, min(delay, len(prefix))) if len(prefix) else (None, 0)

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
        if now - obs_t > self.max_chunk_age:
            # Open loop for longer than max_chunk_age_s since the observation: whatever the chunk's length
            # (a policy may advertise any chunk_length), no row runs that long after what it was predicted from.
            # The rest of the queue is older still: drop it, so the next chunk is asked for at once.
            self.queue.clear()
            self.last_chunk_all_stale = True
            return self._hold(HOLD_ALL_ROWS_STALE, f"row from an observation {now - obs_t:.2f}s old "
                              f"(actuator.max_chunk_age_s {self.max_chunk_age:g})")
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
