"""The actuator against a lying or confused peer (issue 16: the probe's cases D1-D10, kept as tests).

Every test runs the REAL actuator process. The peer it distrusts is played by the test process over real
sockets with the project's own protocol encoder: ``FakePolicy`` is a ROUTER server answering ``metadata``,
``reset`` and ``infer`` the way docs/protocol.md says, except for the one lie under test; sensor streams come
from ``SensorFeed`` publishers. Cameras are 64x48 so a 30 Hz feed costs nothing on a 2-core machine.

| case | the lie | what must happen |
|---|---|---|
| D2 | a reply with 8192 rows (contract: 30) | refused: ``policy_error`` event, no row runs |
| D3 | the echoed ``obs_t`` is 2 s later than the one sent | refused: no row runs under a time it was not asked for |
| D4 | a state (or frame) stamped 30 s in the future, then silence | ``input_refused`` event, then the age limit holds |
| D1 | a 200 MiB camera frame, then normal frames | the subscriber reconnects; the arm acts again within 1 s |
| D10 | the published state differs from the servos at episode start / after a restart | step limit from the servos |
| D8 | wrong columns, 0 rows, NaN ``obs_t``; rows past the limits | ``policy_error``; ``clamped`` event + counter |
| D9 | every reply carries another ``seq`` | ``policy_error``, and the requests back off (no storm) |

Every lie that openpi's wire can carry (rows, columns, values; the sensors' lies) is also told by an
openpi-protocol server (``policy.backend: openpi``, issue 24): ``FakeOpenpiPolicy`` serves as openpi's
``serve_policy`` does (``bench.harness.OpenpiStandIn``). D3 and D9 (and D8's NaN ``obs_t``) lie in fields openpi's
wire does not have (an echoed observation time, a sequence number), so they run on armpipe's wire only.

Plus the units check with the real policy node: a checkpoint whose dataset stats are in LeRobot's
-100..100 range mode is refused on the lift config (degrees) with the joints named, unless the config says
``actuator.units_mismatch_intended``.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from conftest import NodeProcess, wait_for, write_config
from test_actuator import EventTap, SensorFeed, control, ready_detail, start_actuator, start_policy

from bench.harness import OpenpiStandIn, StandInServer, free_port
from common.config import DeploymentConfig, load_config
from common.wire.contract import PolicyContract, units_differences
from common.wire.protocol import KIND_REPLY, KIND_REQUEST, Message
from common.wire.transport import RemoteError, SocketFactory

CHUNK = 30  # rows per reply in the fake policy's contract (1 s at 30 fps)
BACKENDS = ["armpipe", "openpi"]  # policy.backend: the fake policy on armpipe's wire, or on openpi's

Behaviour = Callable[[Message, np.ndarray], Message]


def good_reply(request: Message, rows: np.ndarray) -> Message:
    return Message(kind=KIND_REPLY, src="fake-policy", seq=request.seq,
                   meta={"op": "infer", "obs_t": request.meta["obs_t"], "timings": {"total_s": 0.001}},
                   arrays={"action": rows})


class FakePolicy(StandInServer):
    """A policy server in the test process that speaks docs/protocol.md; ``behaviour`` shapes each infer reply."""

    def __init__(self, config: DeploymentConfig, behaviour: Behaviour = good_reply,
                 rows: np.ndarray | None = None, chunk_length: int = CHUNK) -> None:
        self.config = config
        self.behaviour = behaviour
        dim = len(config.action_names())
        self.rows = rows if rows is not None else np.zeros((CHUNK, dim), np.float32)
        self.contract = PolicyContract(
            policy_type="fake", cameras=config.image_shapes(), state_names=config.state_names(),
            action_names=config.action_names(), chunk_length=chunk_length, n_obs_steps=1, fps=config.fps,
            checkpoint_id="fake", extra={"rows": "n_action_steps", "rtc_max_prefix_rows": 0})
        self.context = zmq.Context()
        super().__init__(SocketFactory(self.context), config.policy.bind, name="fake-policy")
        self.infers: list[tuple[float, Message]] = []  # (arrival time, request)
        self.start()

    def answer(self, request: Message) -> Message:
        op = request.meta.get("op")
        if op == "infer":
            self.infers.append((time.monotonic(), request))
            return self.behaviour(request, self.rows)
        if op == "metadata":
            return Message(kind=KIND_REPLY, seq=request.seq, meta={"op": op, "contract": self.contract.to_meta()})
        return Message(kind=KIND_REPLY, seq=request.seq, meta={"op": op})

    def sent_obs_t(self) -> set[float]:
        return {float(msg.meta["obs_t"]) for _, msg in self.infers}

    def close(self, timeout_s: float = 2.0) -> None:
        super().close(timeout_s)
        self.context.term()


class FakeOpenpiPolicy:
    """The same lies on openpi's wire: an openpi-protocol server served as openpi's ``serve_policy`` serves
    (``bench.harness.OpenpiStandIn``), whose replies carry ``behaviour``'s rows as ``actions``. Each observation
    is recorded as an infer request (obs_t 0: openpi's wire carries none)."""

    def __init__(self, config: DeploymentConfig, behaviour: Behaviour, rows: np.ndarray | None, port: int) -> None:
        self.behaviour = behaviour
        self.rows = rows if rows is not None else np.zeros((CHUNK, len(config.action_names())), np.float32)
        self.infers: list[tuple[float, Message]] = []
        self.server = OpenpiStandIn(self.infer, metadata={}, port=port).start()

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        request = Message(kind=KIND_REQUEST, seq=len(self.infers), meta={"op": "infer", "obs_t": 0.0})
        self.infers.append((time.monotonic(), request))
        return {"actions": self.behaviour(request, self.rows).arrays["action"]}

    def close(self) -> None:
        self.server.close()


def fast_config(tmp_path: Path, actuator: dict[str, Any] | None = None, **extra: Any) -> Path:
    """The lift layout at 30 fps with 64x48 cameras and age limits a loaded 2-core machine can keep."""
    overrides: dict[str, Any] = {
        "actuator": {"dry_run": True, "refill_rows": 10, "max_chunk_age_s": 1.0, **(actuator or {})},
        "policy": {"timeout_s": 1.0, "retries": 1},
        "cameras": {name: {"width": 64, "height": 48, "max_age_s": 0.5} for name in ("front", "wrist")},
        "arms": {"main": {"max_state_age_s": 0.5}},
    }
    for key, value in extra.items():
        overrides[key] = {**overrides.get(key, {}), **value}
    return write_config(tmp_path, "lift", overrides)


class Rig:
    """Fake policy + sensor feed + event tap + the real actuator, with an episode started."""

    def __init__(self, tmp_path: Path, node_processes: list[NodeProcess], behaviour: Behaviour = good_reply, *,
                 rows: np.ndarray | None = None, actuator: dict[str, Any] | None = None,
                 position: np.ndarray | None = None, start: bool = True, chunk_length: int = CHUNK,
                 backend: str = "armpipe", **extra: Any) -> None:
        port = free_port()
        if backend == "openpi":
            extra["policy"] = {**extra.get("policy", {}), "backend": "openpi"}
            extra["openpi"] = {"server": {"endpoint": f"ws://127.0.0.1:{port}", "chunk_length": chunk_length}}
        self.config_path = fast_config(tmp_path, actuator, **extra)
        self.config = load_config(self.config_path)
        self.policy: FakePolicy | FakeOpenpiPolicy = (
            FakeOpenpiPolicy(self.config, behaviour, rows, port) if backend == "openpi"
            else FakePolicy(self.config, behaviour, rows, chunk_length))
        self.tap = EventTap(self.config)
        self.feed = SensorFeed(self.config, hz=30, position=position).start()
        self.node_processes = node_processes
        self.actuator = start_actuator(node_processes, self.config_path).wait_ready(60)
        # The tap hears the actuator before the episode starts: a one-off event of the first chunk (a clamped
        # stretch) must not fall into the subscriber's slow join (an openpi server answers within 60 ms).
        wait_for(lambda: self.tap.actions(), 10, message="the event tap never heard the actuator")
        if start:
            self.start_t = time.monotonic()
            control(self.config, "start")

    def executed(self, since: float = -math.inf, until: float = math.inf) -> list[Message]:
        return [m for m in self.tap.actions(since) if not m.meta["hold"] and m.t < until]

    def close(self) -> None:
        self.feed.close()
        self.tap.close()
        self.policy.close()


@pytest.fixture
def rigs() -> Any:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.close()


# ----------------------------------------------------------------------------------------------------
# D2, D3, D8, D9: what a policy reply may say
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_d2_a_reply_with_more_rows_than_the_contract_is_refused(
        tmp_path: Path, node_processes: list[NodeProcess], rigs: list[Rig], backend: str) -> None:
    rig = Rig(tmp_path, node_processes, rows=np.zeros((8192, 6), np.float32), backend=backend)
    rigs.append(rig)
    error = rig.tap.wait_action(lambda m: m.meta["hold_reason"] == "policy_error", 10,
                                message="no policy_error hold for an 8192-row reply")
    time.sleep(2.0)
    assert rig.policy.infers, "the actuator never asked for a chunk"
    assert rig.executed() == [], "rows of an 8192-row reply (contract: 30) were executed"
    events = rig.tap.events("policy_error")
    assert events and "8192 rows" in events[0].meta["message"] and f"{CHUNK}" in events[0].meta["message"]
    assert error.meta["hold"] is True


@pytest.mark.parametrize("backend", BACKENDS)
def test_d2_no_row_runs_longer_after_its_observation_than_max_chunk_age_even_if_the_contract_says_8192(
        tmp_path: Path, node_processes: list[NodeProcess], rigs: list[Rig], backend: str) -> None:
    # The policy advertises 8192-row chunks and sends them: 4.5 minutes of open loop per observation. The
    # actuator asks for the next chunk only when the queue runs low, so without a bound at execution the
    # rows would run ever further from what they were predicted from.
    rig = Rig(tmp_path, node_processes, rows=np.zeros((8192, 6), np.float32), chunk_length=8192, backend=backend)
    rigs.append(rig)
    rig.tap.wait_action(lambda m: not m.meta["hold"], 15, message="the actuator never executed a row")
    max_age = rig.config.actuator.max_chunk_age_s
    time.sleep(max_age + 2.0)
    executed = rig.executed()
    ages = [m.t - m.meta["lateness_s"] - m.meta["obs_t"] for m in executed]
    assert max(ages) <= max_age + 1e-6, f"a row ran {max(ages):.2f}s after its observation (limit {max_age})"
    # The too-old rest of a chunk is dropped and a new chunk asked for: the arm re-plans instead of stalling.
    assert len({m.meta["obs_t"] for m in executed}) >= 2
    assert any(m.meta["hold_reason"] == "all_rows_stale" for m in rig.tap.actions(since=executed[0].t))


def test_d3_an_echoed_obs_t_that_differs_from_the_one_sent_is_refused(
        tmp_path: Path, node_processes: list[NodeProcess], rigs: list[Rig]) -> None:
    def later_obs_t(request: Message, rows: np.ndarray) -> Message:
        reply = good_reply(request, rows)
        reply.meta["obs_t"] = float(request.meta["obs_t"]) + 2.0  # "this observation is newer than it is"
        return reply

    rig = Rig(tmp_path, node_processes, later_obs_t)
    rigs.append(rig)
    wait_for(lambda: rig.policy.infers, 10, message="no infer request")
    time.sleep(4.0)  # past the lie: rows "meant for" obs_t + 2 s would run by now on the old code
    sent = rig.policy.sent_obs_t()
    ran_under_a_lie = [m.meta["obs_t"] for m in rig.executed() if m.meta["obs_t"] not in sent]
    assert ran_under_a_lie == [], f"{len(ran_under_a_lie)} rows ran under an observation time never sent"
    events = rig.tap.events("policy_error")
    assert events and "obs_t" in events[0].meta["message"]


@pytest.mark.parametrize(("lie", "backend"), [("wrong_columns", "armpipe"), ("zero_rows", "armpipe"),
                                               ("nan_obs_t", "armpipe"), ("wrong_columns", "openpi"),
                                               ("zero_rows", "openpi")])
def test_d8_an_unusable_chunk_makes_a_policy_error_event(
        tmp_path: Path, node_processes: list[NodeProcess], rigs: list[Rig], lie: str, backend: str) -> None:
    def unusable(request: Message, rows: np.ndarray) -> Message:
        if lie == "wrong_columns":
            return good_reply(request, np.zeros((CHUNK, 5), np.float32))
        if lie == "zero_rows":
            return good_reply(request, np.zeros((0, 6), np.float32))
        reply = good_reply(request, rows)
        reply.meta["obs_t"] = math.nan
        return reply

    rig = Rig(tmp_path, node_processes, unusable, backend=backend)
    rigs.append(rig)
    event = wait_for(lambda: rig.tap.events("policy_error"), 10, message=f"no policy_error event for {lie}")[0]
    assert event.meta["op"] == "infer" and event.meta["message"]
    rig.tap.wait_action(lambda m: m.meta["hold_reason"] == "policy_error", 5)
    assert rig.executed() == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_d8_clamped_rows_make_an_event_and_a_counter(
        tmp_path: Path, node_processes: list[NodeProcess], rigs: list[Rig], backend: str) -> None:
    outside = np.full((CHUNK, 6), 500.0, np.float32)  # every joint far past its upper limit
    rig = Rig(tmp_path, node_processes, rows=outside, backend=backend)
    rigs.append(rig)
    event = wait_for(lambda: rig.tap.events("clamped"), 10, message="no clamped event for rows outside the limits")[0]
    assert "shoulder_pan.pos" in event.meta["joints"] and event.meta["count"] >= 1
    stats = wait_for(lambda: [m for m in rig.tap.events("loop_stats") if m.meta.get("clamped_rows", 0) > 0], 5,
                     message="loop_stats never counted clamped rows")
    assert stats[-1].meta["clamped_rows"] >= 1
    upper = np.asarray(rig.config.upper_limits(), np.float32)
    assert all(np.all(m.arrays["action"] <= upper) for m in rig.executed())


def test_d9_replies_with_the_wrong_seq_back_off_instead_of_a_retry_storm(
        tmp_path: Path, node_processes: list[NodeProcess], rigs: list[Rig]) -> None:
    def wrong_seq(request: Message, rows: np.ndarray) -> Message:
        reply = good_reply(request, rows)
        reply.seq = request.seq + 1000
        return reply

    rig = Rig(tmp_path, node_processes, wrong_seq)
    rigs.append(rig)
    wait_for(lambda: rig.policy.infers, 10, message="no infer request")
    first = rig.policy.infers[0][0]
    time.sleep(4.0)
    in_window = [t for t, _ in rig.policy.infers if first <= t < first + 4.0]
    # The old code re-sent at once (~30 requests a second); doubling pauses from 0.5 s give about 4.
    assert len(in_window) <= 5, f"{len(in_window)} infer requests in 4 s: a retry storm"
    events = rig.tap.events("policy_error")
    assert events and "seq" in events[0].meta["message"]
    assert rig.executed() == []


# ----------------------------------------------------------------------------------------------------
# D4, D1: what a sensor may say
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", ["state", "frame"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_d4_a_capture_time_in_the_future_is_refused_and_the_age_limit_holds(
        tmp_path: Path, node_processes: list[NodeProcess], rigs: list[Rig], stream: str, backend: str) -> None:
    rig = Rig(tmp_path, node_processes, backend=backend)
    rigs.append(rig)
    rig.tap.wait_action(lambda m: not m.meta["hold"], 15, message="the actuator never executed a row")
    rig.feed.pause()
    config = rig.config
    image = rig.feed.images["front"]
    future = time.monotonic() + 30.0

    def publish(camera_t: float, state_t: float) -> None:
        rig.feed.cameras["front"].publish(Message(kind="frame", t=camera_t, meta={"camera": "front"},
                                                  arrays={"image": image}))
        rig.feed.cameras["wrist"].publish(Message(kind="frame", t=time.monotonic(), meta={"camera": "wrist"},
                                                  arrays={"image": rig.feed.images["wrist"]}))
        rig.feed.arms["main"].publish(Message(kind="state", t=state_t, meta={
            "arm": "main", "names": config.arms["main"].joint_names()},
            arrays={"position": np.zeros(6, np.float32)}))

    # One message of the stream under test stamped 30 s ahead, then that stream falls silent while the
    # others stay fresh.
    publish(future if stream == "frame" else time.monotonic(), future if stream == "state" else time.monotonic())
    lie_t = time.monotonic()
    while time.monotonic() < lie_t + 2.5:
        now = time.monotonic()
        if stream == "state":
            rig.feed.cameras["front"].publish(Message(kind="frame", t=now, meta={"camera": "front"},
                                                      arrays={"image": image}))
            rig.feed.cameras["wrist"].publish(Message(kind="frame", t=now, meta={"camera": "wrist"},
                                                      arrays={"image": rig.feed.images["wrist"]}))
        else:
            rig.feed.cameras["wrist"].publish(Message(kind="frame", t=now, meta={"camera": "wrist"},
                                                      arrays={"image": rig.feed.images["wrist"]}))
            rig.feed.arms["main"].publish(Message(kind="state", t=now, meta={
                "arm": "main", "names": config.arms["main"].joint_names()},
                arrays={"position": np.zeros(6, np.float32)}))
        time.sleep(1 / 30)
    limit = config.arms["main"].max_state_age_s if stream == "state" else config.cameras["front"].max_age_s
    late = rig.executed(since=lie_t + limit + 0.3)
    assert late == [], f"{len(late)} ticks executed on a {stream} stamped 30 s in the future"
    reason = "stale_state" if stream == "state" else "stale_frame"
    assert rig.tap.actions(since=lie_t + limit + 0.3)[-1].meta["hold_reason"] == reason
    refused = [m for m in rig.tap.events("input_refused") if m.meta.get("reason") == "future_capture_time"]
    assert refused and refused[0].meta["kind"] == stream and refused[0].meta["ahead_s"] > 29


@pytest.mark.parametrize("backend", BACKENDS)
def test_d1_a_frame_over_maxmsgsize_then_normal_frames_acts_again_within_a_second(
        tmp_path: Path, node_processes: list[NodeProcess], rigs: list[Rig], backend: str) -> None:
    rig = Rig(tmp_path, node_processes, backend=backend)
    rigs.append(rig)
    rig.tap.wait_action(lambda m: not m.meta["hold"], 15, message="the actuator never executed a row")
    oversized = bytearray(200 << 20)  # one 200 MiB frame: over MAXMSGSIZE (128 MiB)
    rig.feed.cameras["front"].sock.send_multipart([b"\x80", oversized], copy=False)
    sent_t = time.monotonic()
    del oversized
    time.sleep(3.0)
    acting = rig.executed(since=sent_t + 1.0)
    assert acting, f"no row executed from 1 s after the oversized frame on:\n{rig.actuator.log()[-2000:]}"
    stale_late = [m for m in rig.tap.actions(since=sent_t + 1.0) if m.meta["hold_reason"] == "stale_frame"]
    assert stale_late == []
    reconnected = rig.tap.events("reconnected")
    assert reconnected and reconnected[0].meta["endpoint"] == rig.config.cameras["front"].endpoint
    assert "MAXMSGSIZE" in reconnected[0].meta["reason"]


# ----------------------------------------------------------------------------------------------------
# D10: anchored on the servos, at an episode start and after a restart
# ----------------------------------------------------------------------------------------------------


def max_goal_steps(config: DeploymentConfig) -> dict[str, int]:
    stats = json.loads((Path(config.run_dir) / "stats" / "servo_emulator-main.json").read_text())
    return {servo_id: int(servo["max_goal_step"]) for servo_id, servo in stats["servos"].items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_d10_the_step_limit_starts_from_the_servos_not_the_published_state(
        tmp_path: Path, node_processes: list[NodeProcess], rigs: list[Rig], backend: str) -> None:
    # The servos rest at the rest pose; the state stream (a player replaying another episode) says zeros,
    # and the policy asks for zeros too: up to 90 degrees away from where the servos are.
    rig = Rig(tmp_path, node_processes, actuator={"dry_run": False}, start=False, backend=backend)
    rigs.append(rig)
    config = rig.config
    emulator = NodeProcess("servo_emulator", rig.config_path, name="main").start()
    node_processes.append(emulator)
    emulator.wait_ready(60)
    # 1 degree is 4096/360 ticks; allow one tick of rounding.
    step_ticks = [math.ceil(step * 4096 / 360) + 1 for step in config.arms["main"].max_step[:5]]

    def check_servos(when: str) -> None:
        steps = max_goal_steps(rig.config)
        for index, limit in enumerate(step_ticks):
            assert steps[str(index + 1)] <= limit, (f"{when}: servo {index + 1} saw a goal jump of "
                                                    f"{steps[str(index + 1)]} ticks (max_step: {limit})")

    control(rig.config, "start")
    wait_for(lambda: rig.executed(), 20, message=f"no row executed:\n{rig.actuator.log()[-3000:]}")
    time.sleep(1.5)  # the emulator writes its counters twice a second
    check_servos("episode start")
    mismatch = rig.tap.events("anchor_mismatch")
    assert mismatch and "shoulder_lift.pos" in mismatch[0].meta["joints"]
    # ... and moves slowly (rest_step per tick, not max_step) from the servos' pose towards the policy's 0.
    rest_step = rig.config.actuator.rest_step
    first = [np.asarray(m.arrays["action"]) for m in rig.executed()[:20]]
    rest = np.asarray(rig.config.arms["main"].rest_pose, np.float32)
    assert np.max(np.abs(first[0] - rest)) <= rest_step + 0.1  # the servos' pose is the rest pose in whole ticks
    assert max(float(np.max(np.abs(b - a))) for a, b in itertools.pairwise(first)) <= rest_step + 1e-4

    # Killed mid-episode and restarted: the new process anchors on the servos again.
    rig.actuator.kill()
    rig.actuator.ready_path.unlink(missing_ok=True)
    node_processes.remove(rig.actuator)
    rig.actuator = start_actuator(node_processes, rig.config_path).wait_ready(60)
    restart_t = time.monotonic()
    control(rig.config, "start")
    wait_for(lambda: rig.executed(since=restart_t), 20, message="no row executed after the restart")
    time.sleep(1.5)
    check_servos("after a restart")


# ----------------------------------------------------------------------------------------------------
# Units and calibration before moving
# ----------------------------------------------------------------------------------------------------

LIFT_RANGE_MODE = {  # like the teams' lift dataset: LeRobot's -100..100 range mode, saturated at the ends
    "min": [-60.0, -99.0, -97.5, -80.0, -50.0, 0.0],
    "max": [55.0, 40.0, 99.1, 70.0, 60.0, 100.0],
    "mean": [0.0, -40.0, 30.0, 0.0, 5.0, 30.0],
}


def contract_with_stats(config: DeploymentConfig, stats: dict[str, list[float]]) -> PolicyContract:
    return PolicyContract(policy_type="fake", cameras=config.image_shapes(), state_names=config.state_names(),
                          action_names=config.action_names(), chunk_length=CHUNK, n_obs_steps=1, fps=config.fps,
                          checkpoint_id="fake", stats={"observation.state": stats, "action": stats})


def test_units_differences_name_the_joint_and_both_ranges() -> None:
    repo = Path(__file__).resolve().parent.parent
    config = load_config(repo / "configs" / "lift.yaml")
    problems = units_differences(contract_with_stats(config, LIFT_RANGE_MODE), config)
    text = "\n".join(problems)
    assert "units: shoulder_lift.pos (observation.state)" in text and "-99.0..40.0" in text
    assert "elbow_flex.pos (action)" in text and "99.1" in text and "range mode" in text and "degrees" in text
    assert "wrist_flex.pos" not in text  # not saturated: not what gave the units away
    # Degrees stats on a degrees arm: fine. Degrees stats on an arm in range mode: refused.
    degrees = {"min": [-105.0, -95.0, -95.0, -100.0, -150.0, 0.0], "max": [100.0, 90.0, 95.0, 100.0, 140.0, 90.0],
               "mean": [0.0] * 6}
    assert units_differences(contract_with_stats(config, degrees), config) == []
    config.arms["main"].use_degrees = False
    range_arm = "\n".join(units_differences(contract_with_stats(config, degrees), config))
    assert "units: shoulder_pan.pos" in range_arm and "wrist_roll.pos" in range_arm and "beyond +-100" in range_arm
    # A range outside the configured limits, whatever the units.
    config.arms["main"].use_degrees = True
    config.arms["main"].upper_limits = [110.0, 100.0, 100.0, 100.0, 120.0, 100.0]
    limits = units_differences(contract_with_stats(config, degrees), config)
    assert any("range: wrist_roll.pos (action): the checkpoint's dataset range -150.0..140.0" in p
               and "limits -150..120" in p for p in limits), limits
    # No stats in the contract: nothing to compare.
    assert units_differences(contract_with_stats(config, {}), config) == []


def range_mode_dataset(root: Path, config: DeploymentConfig) -> Path:
    """A dataset root whose meta/stats.json is in range mode (all the checkpoint maker reads of it)."""
    stats: dict[str, Any] = {key: {**{k: list(v) for k, v in LIFT_RANGE_MODE.items()}, "std": [20.0] * 6,
                                   "count": [1000]} for key in ("observation.state", "action")}
    for name in config.cameras:
        stats[f"observation.images.{name}"] = {"min": [[[0.0]]] * 3, "max": [[[1.0]]] * 3,
                                               "mean": [[[0.45]]] * 3, "std": [[[0.25]]] * 3, "count": [1000]}
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "stats.json").write_text(json.dumps(stats))
    return root


def test_a_checkpoint_trained_on_range_mode_data_is_refused_on_the_degrees_lift_config(
        tmp_path: Path, node_processes: list[NodeProcess], tmp_path_factory: pytest.TempPathFactory) -> None:
    from common.tools.checkpoint_maker import build_checkpoint

    config_path = fast_config(tmp_path)
    config = load_config(config_path)
    dataset = range_mode_dataset(tmp_path / "lift-range-mode", config)
    checkpoint = build_checkpoint(config, tmp_path_factory.mktemp("ckpt-range"), dataset_root=dataset, size="tiny")
    config_path = fast_config(tmp_path, policy={"checkpoint": str(checkpoint), "warmup": 0, "timeout_s": 10.0,
                                                "num_inference_steps": 2})
    config = load_config(config_path)
    start_policy(node_processes, config_path)
    actuator = start_actuator(node_processes, config_path).wait_ready(60)
    assert ready_detail(actuator)["contract"] == "mismatch"
    status = control(config, "status").meta
    text = "\n".join(status["differences"])
    assert "units: shoulder_lift.pos (observation.state)" in text and "-99.0..40.0" in text, text
    assert "elbow_flex.pos" in text and "use_degrees: true" in text
    with pytest.raises(RemoteError, match=r"shoulder_lift\.pos"):
        control(config, "start")
    actuator.stop()
    node_processes.remove(actuator)
    actuator.ready_path.unlink(missing_ok=True)

    # The same checkpoint on purpose: the config says the disagreement is intended.
    intended = start_actuator(node_processes, config_path, "--actuator.units_mismatch_intended=true").wait_ready(60)
    assert ready_detail(intended)["contract"] == "ok"
    assert control(config, "start").meta["state"] == "running"
    assert "units: shoulder_lift.pos" in intended.log()
