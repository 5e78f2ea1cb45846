"""The step limit holds at the bus (issue 26): every goal a servo receives is within ``max_step`` of the goal
it received before, whatever happened between the two writes.

Real processes: the servo emulator (recording every Goal_Position write, ``emulator.record_goals``) behind
LeRobot's Feetech driver, the real actuator writing to it, and a policy in the test process
(``test_lying_peer.FakePolicy``, the protocol as docs/protocol.md says it) whose plan moves five joints
steadily at half their ``max_step`` per tick. The test stalls the actuator's bus writer by holding the arm's
bus lock (the OS lock every ``ArmBus`` transaction takes, ``common.feetech_bus``) for 18 control periods
while the plan goes on, releases it, and checks every write the servos received against the previous one;
then the plan stops, and the servos' goal must reach the plan's last pose (the arm caught up, by steps).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import NodeProcess, wait_for
from test_actuator import control
from test_lying_peer import Rig

from common.config import SO101_JOINTS
from common.wire.protocol import KIND_REPLY, Message
from nodes.servo_emulator.sts3215 import INITIAL_CALIBRATION, ticks_for

# How long the bus writer is kept off the bus, in control periods (30 fps): 18 stays below ArmBus's 1 s lock
# timeout (the write waits, then goes through); 45 passes it (the write fails, the writer reconnects and reads
# the servos' goal back while the loop holds bus_error).
STALL_PERIODS = (18, 45)
SIGNS = np.array([1, 1, -1, -1, 1, 0], np.float64)  # directions that keep the plan inside lift's limits
AMPLITUDE = 60.0  # robot units each moving joint swings away from the rest pose and back


class Plan:
    """rest + sign * triangle(t): half the smallest max_step per tick, constant after ``freeze_t`` (seconds, the
    robot's monotonic clock, like every obs_t)."""

    def __init__(self, rest: np.ndarray, max_step: np.ndarray, fps: int) -> None:
        self.rest = rest.astype(np.float64)
        self.speed = 0.5 * float(np.min(max_step)) * fps  # units per second
        self.segment_s = AMPLITUDE / self.speed  # one way out or back
        self.t0: float | None = None
        self.freeze_t = math.inf
        self.fps = fps

    def at(self, t: float) -> np.ndarray:
        assert self.t0 is not None
        phase = np.mod(self.speed * (min(t, self.freeze_t) - self.t0), 2 * AMPLITUDE)
        return self.rest + SIGNS * np.minimum(phase, 2 * AMPLITUDE - phase)

    def reply(self, request: Message, rows: np.ndarray) -> Message:
        obs_t = float(request.meta["obs_t"])
        if self.t0 is None:
            self.t0 = obs_t
        actions = np.stack([self.at(obs_t + k / self.fps) for k in range(len(rows))]).astype(np.float32)
        return Message(kind=KIND_REPLY, src="fake-policy", seq=request.seq,
                       meta={"op": "infer", "obs_t": request.meta["obs_t"], "timings": {"total_s": 0.001}},
                       arrays={"action": actions})


def goal_writes(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("stall_periods", STALL_PERIODS)
def test_a_stalled_bus_writer_resumes_at_the_step_limit_and_catches_up(
        tmp_path: Path, node_processes: list[NodeProcess], stall_periods: int) -> None:
    rest = np.array([0, -90, 90, 60, 0, 10], np.float32)
    plan_holder: list[Plan] = []
    rig = Rig(tmp_path, node_processes, lambda request, rows: plan_holder[0].reply(request, rows),
              actuator={"dry_run": False, "max_chunk_age_s": 1.5}, position=rest, start=False,
              arms={"main": {"max_state_age_s": 0.5, "rest_pose": rest.tolist()}},
              emulator={"record_goals": True, "speed_deg_s": 720, "lag_s": 0.0})
    try:
        config = rig.config
        arm = config.arms["main"]
        max_step = np.asarray(arm.max_step, np.float64)
        plan = Plan(rest, max_step, config.fps)
        plan_holder.append(plan)
        emulator = NodeProcess("servo_emulator", rig.config_path, name="main").start()
        node_processes.append(emulator)
        emulator.wait_ready(60)
        goals_path = Path(config.run_dir) / "stats" / "servo_emulator-main-goals.jsonl"
        calibration = INITIAL_CALIBRATION[arm.robot_id]
        # max_step in servo ticks per joint (LeRobot's degrees: 4095/360 ticks a degree; the gripper's 0..100
        # spans its calibrated range), plus one tick for the driver's rounding of each goal.
        step_ticks = [abs(ticks_for(float(rest[i]) + max_step[i], joint, calibration[joint], True)
                          - ticks_for(float(rest[i]), joint, calibration[joint], True)) + 1.0
                      for i, joint in enumerate(SO101_JOINTS)]

        control(config, "start")
        started = wait_for(lambda: rig.executed(), 60, message=f"no row executed:\n{rig.actuator.log()[-3000:]}")
        moving_since = started[0].t
        wait_for(lambda: rig.executed(since=moving_since + 0.3), 10, message="the plan did not run for 0.3 s")
        # Stall inside one straight segment of the plan, so the commanded target runs away from the servos' goal.
        assert plan.t0 is not None
        segments = math.ceil((time.monotonic() - plan.t0) / plan.segment_s)
        time.sleep(max(0.0, plan.t0 + segments * plan.segment_s + 0.05 - time.monotonic()))

        # Stall: the test holds the arm's bus lock, so the writer waits while the control loop goes on.
        lock_fd = os.open(arm.bus_lock_path(), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            stall_start = time.monotonic()
            time.sleep(stall_periods / config.fps)
            stall_end = time.monotonic()
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.close(lock_fd)
        plan.freeze_t = stall_end + 1.5  # rows for later times (all from chunks asked for after now) stand still
        final = plan.at(plan.freeze_t)
        final_ticks = [round(ticks_for(float(final[i]), joint, calibration[joint], True))
                       for i, joint in enumerate(SO101_JOINTS)]

        def caught_up() -> bool:
            last: dict[int, int] = {}
            for write in goal_writes(goals_path):
                last[write["id"]] = write["goal"]
            return all(abs(last.get(i + 1, -10**6) - final_ticks[i]) <= 1 for i in range(6))

        wait_for(caught_up, 20, message=f"the servos never reached the plan's last pose {final_ticks}:\n"
                 f"{rig.actuator.log()[-3000:]}")

        # The control loop commanded the plan straight through the stall: several max_steps while the writer
        # could not write (else the test would prove nothing).
        during = [np.asarray(m.arrays["action"], np.float64) for m in rig.executed(since=stall_start,
                                                                                    until=stall_end)]
        assert len(during) >= 9, f"the loop did not tick through the stall: {len(during)} rows"
        moved = np.abs(during[-1] - during[0])[:5] / max_step[:5]
        assert np.max(moved) >= 4, f"the commanded target moved only {moved} max_steps during the stall"

        writes = goal_writes(goals_path)
        torque_on = [w for w in writes if w["torque"]]
        assert len(torque_on) > 6 * 60, f"too few goal writes recorded: {len(torque_on)}"
        # The servos really went without a goal for the stall.
        times = sorted({w["t"] for w in torque_on})
        gaps = np.diff(times)
        assert gaps.max() >= 0.8 * stall_periods / config.fps, f"no stall seen at the servos (longest gap {gaps.max()})"
        # Every goal each servo received is within max_step of the one it received before.
        jumps = [(w["id"], w["goal"] - w["before"], round(w["t"] - stall_end, 3)) for w in torque_on
                 if abs(w["goal"] - w["before"]) > step_ticks[w["id"] - 1]]
        assert not jumps, (f"goal jumps over max_step at the servos (servo, ticks, s after the stall): {jumps[:12]}; "
                           f"max_step in ticks {[round(s, 1) for s in step_ticks]}")
        # ... and the writer caught up by full steps after the stall rather than staying behind.
        after = [w for w in torque_on if w["t"] > stall_end and w["id"] == 1]
        full_steps = [w for w in after[:40] if abs(w["goal"] - w["before"]) >= step_ticks[0] - 2]
        pairs = [(w["before"], w["goal"]) for w in after[:20]]
        assert len(full_steps) >= 3, f"no catch-up at max_step after the stall (servo 1 goals): {pairs}"
        log = rig.actuator.log()
        assert "catching up at max_step" in log
        if stall_periods / config.fps > 1.0:  # past the lock timeout: reconnected, and the goal read back again
            assert log.count("the servos' goal read back") >= 2 and "reconnecting" in log, log[-3000:]
    finally:
        rig.close()
