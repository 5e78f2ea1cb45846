"""The actuator node, as real processes over real sockets.

- The episode state machine and control-socket errors.
- Contract check: a 6-joint checkpoint with the 12-joint sort config, and a config missing a camera the
  policy needs, make it refuse to move and say what differs; a restarted policy with the right checkpoint
  unblocks it.
- The policy killed with SIGKILL mid-run: stale rows are dropped, the loop holds (never replays a row),
  and it resumes by itself when the policy comes back.
- Dry-run publishes but never writes to the bus; a normal run moves the emulated servos.
- Lockstep: row j of a chunk from frame i runs at frame i + j.
- A real policy slower than a chunk lasts: the actuator says so once (one ``schedule`` event, one log
  line) and the real monitor shows it on its panel state.
- ``overlap: rtc`` with the real policy: each chunk's frozen rows are the previous chunk's rows for those
  ticks, and the requests carry the policy's guidance rows past the queued ones.

Sensor streams come either from the real camera / state-reader / servo-emulator nodes or, where a test
needs control over timestamps, from ``common.wire.transport.Publisher``s in the test process (real producers
on real sockets). The policy is always the real policy node with a tiny checkpoint.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import NodeProcess, wait_for, write_config

from common.config import DeploymentConfig, load_config
from common.wire.actuator_client import ActuatorClient
from common.wire.protocol import KIND_ACTION, Message
from common.wire.transport import LatestSubscriber, Publisher, RemoteError, SocketFactory
from nodes.actuator.episodes import IDLE, RUNNING, STOPPING, EpisodeError, Episodes

# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


class EventTap:
    """Collects everything the actuator publishes (a real SUB socket, drained by a thread)."""

    def __init__(self, config: DeploymentConfig) -> None:
        self.sub = LatestSubscriber(SocketFactory(), [config.actuator.events_endpoint], hwm=10000)
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self.sub.poll(0.05)
            if batch:
                with self._lock:
                    self.messages.extend(batch)

    def snapshot(self) -> list[Message]:
        with self._lock:
            return list(self.messages)

    def actions(self, since: float = -np.inf) -> list[Message]:
        return [m for m in self.snapshot() if m.kind == KIND_ACTION and m.t >= since]

    def events(self, name: str, since: float = -np.inf) -> list[Message]:
        return [m for m in self.snapshot() if m.meta.get("event") == name and m.t >= since]

    def wait_action(self, predicate: Callable[[Message], bool], timeout_s: float = 30.0, since: float = -np.inf,
                    message: str = "") -> Message:
        def found() -> Message | None:
            return next((m for m in self.actions(since) if predicate(m)), None)

        return wait_for(found, timeout_s, message=message or "no matching action message")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sub.close()


class SensorFeed:
    """Publishes every camera's frames and every arm's state from the test process at ``hz``.

    ``age_s`` stamps each message that much in the past (as if captured earlier), which makes the
    policy's oldest-part observation time, and so the stale rows on arrival, deterministic.
    """

    def __init__(self, config: DeploymentConfig, *, hz: float = 20.0, age_s: float = 0.0,
                 position: np.ndarray | None = None, lockstep: bool = False) -> None:
        factory = SocketFactory()
        self.config = config
        self.hz = hz
        self.age_s = age_s
        self.cameras = {name: Publisher(factory, cam.endpoint, f"camera-{name}")
                        for name, cam in config.cameras.items()}
        self.arms = {name: Publisher(factory, arm.state_endpoint, f"state_reader-{name}")
                     for name, arm in config.arms.items()}
        self.position = position if position is not None else np.zeros(6, np.float32)
        rng = np.random.default_rng(0)
        self.images = {name: rng.integers(0, 255, (cam.height, cam.width, 3), dtype=np.uint8)
                       for name, cam in config.cameras.items()}
        self.frame_index = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lockstep = lockstep

    def publish_once(self, frame_index: int | None = None) -> None:
        t = time.monotonic() - self.age_s
        extra = {} if frame_index is None else {"frame_index": frame_index, "episode_index": 0}
        for name, pub in self.cameras.items():
            pub.publish(Message(kind="frame", t=t, meta={"camera": name, "source": "camera", **extra},
                                arrays={"image": self.images[name]}))
        for name, pub in self.arms.items():
            pub.publish(Message(kind="state", t=t, meta={"arm": name, "names": self.config.arms[name].joint_names(),
                                                         "source": "test", **extra},
                                arrays={"position": self.position.astype(np.float32)}))

    def start(self) -> SensorFeed:
        def run() -> None:
            while not self._stop.is_set():
                self.publish_once()
                self._stop.wait(1.0 / self.hz)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def pause(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._stop.clear()

    def close(self) -> None:
        self.pause()
        for pub in (*self.cameras.values(), *self.arms.values()):
            pub.close()


def control(config: DeploymentConfig, op: str, **meta: Any) -> Message:
    client = ActuatorClient(SocketFactory(), config.actuator.control_endpoint, client="test", timeout_s=3.0, retries=1)
    try:
        return client.send(op, **meta)
    finally:
        client.close()


def policy_config(tmp_path: Path, task: str, checkpoint: Path, endpoint_from: Path | None = None) -> Path:
    """A config for the policy node serving ``checkpoint``; optionally on the endpoint of another config."""
    overrides: dict[str, Any] = {"policy": {"checkpoint": str(checkpoint)}}
    directory = tmp_path / f"policy-{task}"
    directory.mkdir(exist_ok=True)
    if endpoint_from is not None:
        other = yaml.safe_load(endpoint_from.read_text())
        overrides["policy"].update(bind=other["policy"]["bind"], endpoint=other["policy"]["endpoint"])
        overrides["run_dir"] = other["run_dir"]
    return write_config(directory, task, overrides)


def start_policy(node_processes: list[NodeProcess], config_path: Path) -> NodeProcess:
    policy = NodeProcess("policy", config_path).start()
    node_processes.append(policy)
    return policy.wait_ready(180)


def start_actuator(node_processes: list[NodeProcess], config_path: Path, *args: str) -> NodeProcess:
    actuator = NodeProcess("actuator", config_path, args=list(args)).start()
    node_processes.append(actuator)
    return actuator


def ready_detail(node: NodeProcess) -> dict[str, Any]:
    return json.loads(node.ready_path.read_text())


# ----------------------------------------------------------------------------------------------------
# Episode state machine (pure)
# ----------------------------------------------------------------------------------------------------


def test_episode_state_machine_and_its_errors() -> None:
    episodes = Episodes()
    with pytest.raises(EpisodeError, match="contract"):
        episodes.start()
    episodes.set_contract(True, [])
    assert episodes.public_state == IDLE
    with pytest.raises(EpisodeError, match="no episode is running"):
        episodes.stop()
    with pytest.raises(EpisodeError, match="no episode has stopped"):
        episodes.label("success")
    first = episodes.start()
    assert (episodes.state, first.index, episodes.episode_index) == (RUNNING, 0, 0)
    with pytest.raises(EpisodeError, match="already running"):
        episodes.start()
    with pytest.raises(EpisodeError) as bad_label:
        episodes.stop("great")
    assert bad_label.value.field == "meta.label"
    episodes.stop("failure")
    assert episodes.state == STOPPING
    episodes.rest_reached()
    assert episodes.state == IDLE and episodes.episode_index == -1
    assert episodes.label("success").label == "success"
    assert episodes.stopped[0].label == "success"
    with pytest.raises(EpisodeError) as bad_index:
        episodes.start(episode_index=-3)
    assert bad_index.value.field == "meta.episode_index"
    assert episodes.start(episode_index=7).index == 7
    ended = episodes.set_contract(False, ["state: policy expects 6 values"])
    assert ended is not None and ended.stop_reason == "contract_mismatch"
    assert episodes.public_state == "refused"
    with pytest.raises(EpisodeError, match="policy expects 6 values"):
        episodes.start()


def test_stop_holds_then_moves_to_the_rest_pose_at_rest_step_and_goes_idle() -> None:
    from nodes.actuator.core import ControlCore

    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "sort.yaml")
    config.arms["right"].rest_pose = []  # this arm has no rest pose: it stays where it was
    config.actuator.rest_step = 2.0
    core = ControlCore(config)
    core.set_contract(True, [])
    core.start()
    measured = np.zeros(12, np.float32)
    assert core.tick(0.0, "", measured).reason == "queue_empty"
    core.stop("success")
    rest = np.asarray(config.arms["left"].rest_pose, np.float32)
    previous = np.zeros(12, np.float32)
    for tick in range(1, 200):
        decision = core.tick(tick / 30, "", measured)
        if core.episodes.state == IDLE and decision.reason != "stopped":
            break
        assert decision.hold and decision.reason == "stopped" and decision.write
        assert np.max(np.abs(decision.target - previous)) <= 2.0 + 1e-6  # rest_step, below max_step 3
        previous = decision.target
    else:
        pytest.fail("never reached the rest pose")
    np.testing.assert_allclose(previous[:6], rest, atol=1e-3)
    np.testing.assert_array_equal(previous[6:], np.zeros(6))
    assert decision.reason == "idle" and decision.write is False
    assert tick == 46  # the largest move (90 degrees) at 2 per tick, then one idle tick


# ----------------------------------------------------------------------------------------------------
# Control socket, no policy running
# ----------------------------------------------------------------------------------------------------


def test_control_socket_answers_bad_commands_with_the_field_and_keeps_serving(
        tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    # No policy at all: with contract_wait_s the node still becomes ready (contract "unchecked").
    config_path = write_config(tmp_path, "lift", {"actuator": {"dry_run": True, "contract_wait_s": 0.5},
                                                  "policy": {"timeout_s": 0.3}})
    config = load_config(config_path)
    tap = EventTap(config)
    feed = SensorFeed(config).start()
    try:
        actuator = start_actuator(node_processes, config_path).wait_ready(30)
        assert ready_detail(actuator)["contract"] == "unchecked"
        with pytest.raises(RemoteError) as start_error:
            control(config, "start")
        assert "refusing to start" in str(start_error.value) and start_error.value.field == "op"
        with pytest.raises(RemoteError) as stop_error:
            control(config, "stop")
        assert "no episode is running" in str(stop_error.value)
        with pytest.raises(RemoteError) as label_error:
            control(config, "label", label="maybe")
        assert label_error.value.field == "meta.label"
        with pytest.raises(RemoteError) as op_error:
            control(config, "infer")
        assert op_error.value.field == "meta.op" and "start" in op_error.value.expected
        status = control(config, "status").meta
        assert status["state"] == "refused" and status["contract_ok"] is False and status["episode_index"] == -1
        assert status["ticks"] > 0
        # Holding while the policy cannot be reached: the commanded target is the measured position.
        # (Ticks before the first state arrives carry NaN, "no position known"; on a busy machine the
        # state subscription may still be joining, so wait for a tick that has a position.)
        held = tap.wait_action(lambda m: m.meta["hold_reason"] == "policy_unreachable"
                               and bool(np.all(np.isfinite(m.arrays["action"]))))
        assert held.meta["hold"] is True and held.meta["episode_index"] == -1
        np.testing.assert_array_equal(held.arrays["action"], np.zeros(6))
        assert held.meta["names"] == config.action_names()
        assert actuator.proc.poll() is None
    finally:
        feed.close()
        tap.close()


# ----------------------------------------------------------------------------------------------------
# Contract check against the real policy node
# ----------------------------------------------------------------------------------------------------


def test_refuses_a_6_joint_policy_on_the_12_joint_sort_config_until_the_right_one_returns(
        tmp_path: Path, node_processes: list[NodeProcess], tiny_checkpoint: Any) -> None:
    config_path = write_config(tmp_path, "sort", {"actuator": {"dry_run": True}, "policy": {"timeout_s": 1.0}})
    config = load_config(config_path)
    tap = EventTap(config)
    try:
        lift_policy = start_policy(node_processes, policy_config(tmp_path, "lift", tiny_checkpoint("lift"),
                                                                 endpoint_from=config_path))
        actuator = start_actuator(node_processes, config_path).wait_ready(60)
        assert ready_detail(actuator)["contract"] == "mismatch"
        status = control(config, "status").meta
        assert status["state"] == "refused" and status["contract_ok"] is False
        differences = " | ".join(status["differences"])
        assert "state: policy expects 6 values, config has 12" in differences
        assert "action: policy returns 6 values, config drives 12 joints" in differences
        assert "policy needs camera 'wrist'" in differences
        with pytest.raises(RemoteError) as refused:
            control(config, "start")
        assert "refusing to start" in str(refused.value) and "policy expects 6 values" in str(refused.value)
        mismatch = wait_for(lambda: tap.events("contract_mismatch"), 10)[0]
        assert mismatch.meta["differences"] == status["differences"]
        held = tap.wait_action(lambda m: m.meta["hold_reason"] == "contract_mismatch")
        assert held.meta["hold"] is True and held.meta["episode_index"] == -1
        assert "policy expects 6 values" in actuator.log()
        assert actuator.proc.poll() is None

        # The right checkpoint comes back on the same endpoint: the periodic re-check unblocks the actuator.
        lift_policy.kill()
        lift_policy.ready_path.unlink(missing_ok=True)  # SIGKILL leaves its readiness file behind
        start_policy(node_processes, policy_config(tmp_path, "sort", tiny_checkpoint("sort"),
                                                   endpoint_from=config_path))
        wait_for(lambda: control(config, "status").meta["contract_ok"], 20, interval_s=0.5,
                 message="the actuator did not accept the restarted policy with the right checkpoint")
        assert control(config, "start").meta["state"] == "running"
        assert control(config, "status").meta["differences"] == []
    finally:
        tap.close()


def test_refuses_when_the_config_lacks_a_camera_the_policy_needs(
        tmp_path: Path, node_processes: list[NodeProcess], tiny_checkpoint: Any) -> None:
    config_path = write_config(tmp_path, "lift", {"actuator": {"dry_run": True}, "policy": {"timeout_s": 1.0}})
    raw = yaml.safe_load(config_path.read_text())
    del raw["cameras"]["wrist"]
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    config = load_config(config_path)
    start_policy(node_processes, policy_config(tmp_path, "lift", tiny_checkpoint("lift"), endpoint_from=config_path))
    actuator = start_actuator(node_processes, config_path).wait_ready(60)
    assert ready_detail(actuator)["contract"] == "mismatch"
    status = control(config, "status").meta
    assert status["contract_ok"] is False
    assert any("policy needs camera 'wrist'" in text for text in status["differences"]), status["differences"]
    with pytest.raises(RemoteError, match="policy needs camera 'wrist'"):
        control(config, "start")


# ----------------------------------------------------------------------------------------------------
# Scheduling and holds with the real policy: killed mid-run, then back
# ----------------------------------------------------------------------------------------------------

# These tests need rows that are still in the future when the chunk arrives. On a busy 2-core machine a
# CPU round trip of the tiny policy takes 0.5-6 s, longer than a 30 Hz chunk (8 rows = 0.27 s), so they
# run the deployment at 2 Hz (8 rows = 4 s) with a checkpoint built for 2 Hz. The logic is the same at any
# fps; bench/loop_jitter.py measures the 30 Hz loop.
SLOW_FPS = 2


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny DiffusionPolicy checkpoint (untrained) for the lift layout at SLOW_FPS."""
    from common.tools.checkpoint_maker import build_checkpoint

    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "lift.yaml")
    config.fps = SLOW_FPS
    return build_checkpoint(config, tmp_path_factory.mktemp("ckpt-lift-2hz"), policy_type="diffusion", size="tiny")


def slow_config(tmp_path: Path, checkpoint: Path, actuator: dict[str, Any], **extra: Any) -> Path:
    """The lift layout at SLOW_FPS, with input age limits that a loaded machine can keep."""
    overrides: dict[str, Any] = {
        "fps": SLOW_FPS,
        "actuator": {"max_chunk_age_s": 30.0, **actuator},
        # A reply may take seconds on a saturated CPU: only a dead policy should count as unreachable.
        "policy": {"checkpoint": str(checkpoint), "timeout_s": 8.0, "num_inference_steps": 2, "warmup": 0},
        "cameras": {name: {"max_age_s": 3.0, "fps": 5} for name in ("front", "wrist")},
        "arms": {"main": {"max_state_age_s": 3.0, "read_hz": 20}},
    }
    for key, value in extra.items():
        overrides[key] = {**overrides.get(key, {}), **value}
    return write_config(tmp_path, "lift", overrides)


def test_drops_stale_rows_holds_when_the_policy_is_killed_and_resumes_when_it_returns(
        tmp_path: Path, node_processes: list[NodeProcess], slow_checkpoint: Path) -> None:
    config_path = slow_config(tmp_path, slow_checkpoint, {"dry_run": True})
    config = load_config(config_path)
    period = 1.0 / config.fps
    tap = EventTap(config)
    # Frames and states stamped 0.6 s before they are sent: the observation is that old, so at least its
    # first row (meant for obs_t) is in the past when any chunk arrives, on any machine.
    feed = SensorFeed(config, hz=10, age_s=0.6, position=np.array([0, -20, 20, 10, 0, 30], np.float32)).start()
    try:
        policy = start_policy(node_processes, config_path)
        start_actuator(node_processes, config_path).wait_ready(60)
        assert control(config, "start").meta["episode_index"] == 0
        tap.wait_action(lambda m: not m.meta["hold"], 90, message="the actuator never executed a row")

        policy.kill()  # SIGKILL mid-run
        kill_t = time.monotonic()
        policy.ready_path.unlink(missing_ok=True)  # SIGKILL leaves its readiness file behind
        tap.wait_action(lambda m: m.meta["hold_reason"] == "policy_unreachable", 30, since=kill_t,
                        message="no policy_unreachable hold after the policy was killed")
        time.sleep(1.0)

        restart_t = time.monotonic()
        start_policy(node_processes, config_path)
        resumed = tap.wait_action(lambda m: not m.meta["hold"], 120, since=restart_t,
                                  message="the actuator did not resume after the policy came back")
        control(config, "stop", label="success")
    finally:
        feed.close()
        tap.close()

    # Rows already in the past on arrival were dropped, exactly those: row k of a chunk from an
    # observation at obs_t is for obs_t + k/fps, and a tick at t owns [t - period/2, t + period/2).
    chunks = tap.events("chunk")
    assert chunks
    for chunk in chunks:
        rows = np.asarray(chunk.arrays["chunk"]).shape[0]
        row_times = chunk.meta["obs_t"] + np.arange(rows) * period
        expected_stale = int(np.count_nonzero(row_times < chunk.meta["arrival_t"] - period / 2))
        assert chunk.meta["dropped_stale"] == expected_stale >= 1
        assert chunk.meta["accepted"] + chunk.meta["dropped_stale"] == chunk.meta["rows"] == rows

    actions = [m for m in tap.actions() if m.meta["episode_index"] == 0]
    executed = [m for m in actions if not m.meta["hold"]]
    # Each executed row ran in its own tick's slot, and no row ran twice.
    for action in executed:
        scheduled = action.t - action.meta["lateness_s"]
        assert abs(action.meta["row_t"] - scheduled) <= period / 2 + 1e-6
    row_times = [action.meta["row_t"] for action in executed]
    assert all(later > earlier for earlier, later in itertools.pairwise(row_times))

    # Once the last chunk received before the kill has run out (8 rows), until the policy answered again,
    # every tick held the last commanded target: no old row was replayed.
    last_chunk_end = max(c.meta["obs_t"] + (c.meta["rows"] - 0.5) * period for c in chunks if c.t < kill_t + 0.5)
    dead = [m for m in actions if max(kill_t + 0.5, last_chunk_end) <= m.t < resumed.t]
    assert dead and all(m.meta["hold"] for m in dead)
    reasons = {m.meta["hold_reason"] for m in dead}
    assert "policy_unreachable" in reasons and reasons <= {"policy_unreachable", "queue_empty"}, reasons
    last_executed = [m for m in executed if m.t < dead[0].t][-1]
    for held in dead:
        np.testing.assert_array_equal(held.arrays["action"], last_executed.arrays["action"])
    hold_events = [m for m in tap.events("hold") if m.meta["reason"] == "policy_unreachable"]
    assert hold_events and hold_events[-1].meta["count"] >= 1


# ----------------------------------------------------------------------------------------------------
# The whole robot side: cameras, servo emulator, state-reader, policy, actuator
# ----------------------------------------------------------------------------------------------------


def emulator_sync_writes(config: DeploymentConfig) -> int:
    stats_path = Path(config.run_dir) / "stats" / "servo_emulator-main.json"
    stats = json.loads(stats_path.read_text())
    return int(stats["instructions"].get("sync_write", 0))


def test_dry_run_never_writes_the_bus_and_a_normal_run_moves_the_emulated_servos(
        tmp_path: Path, node_processes: list[NodeProcess], slow_checkpoint: Path) -> None:
    config_path = slow_config(tmp_path, slow_checkpoint, {"auto_start": True})
    config = load_config(config_path)
    rest = np.asarray(config.arms["main"].rest_pose, np.float32)
    for module, name in (("servo_emulator", "main"), ("state_reader", "main"), ("camera", "front"),
                         ("camera", "wrist")):
        node = NodeProcess(module, config_path, name=name).start()
        node_processes.append(node)
        node.wait_ready(120)
    start_policy(node_processes, config_path)
    states = LatestSubscriber(SocketFactory(), [config.arms["main"].state_endpoint], hwm=10000)

    def newest_position() -> np.ndarray:
        messages = wait_for(lambda: states.poll(0.5), 10, message="no state from the state-reader")
        return np.asarray(messages[-1].arrays["position"])

    try:
        np.testing.assert_allclose(newest_position(), rest, atol=0.5)  # the emulated arm starts at rest

        # Dry-run: an episode runs and targets are published, but nothing reaches the bus.
        tap = EventTap(config)
        dry = start_actuator(node_processes, config_path, "--actuator.dry_run=true")
        dry.wait_ready(60)
        writes_before = emulator_sync_writes(config)
        try:
            tap.wait_action(lambda m: not m.meta["hold"], 120, message="the dry-run actuator never executed a row")
            wait_for(lambda: len([m for m in tap.actions() if not m.meta["hold"]]) >= 3, 60)
            executed = [m for m in tap.actions() if not m.meta["hold"]]
        finally:
            tap.close()
        assert all(m.meta["dry_run"] is True for m in executed)
        # The commanded targets left the rest pose, so a write would have shown on the servos.
        assert np.max(np.abs(executed[-1].arrays["action"] - rest)) > 1.0
        time.sleep(1.0)
        np.testing.assert_allclose(newest_position(), rest, atol=0.5)
        assert emulator_sync_writes(config) == writes_before
        assert control(config, "status").meta["bus"] == {}
        dry.stop()
        node_processes.remove(dry)

        # The same episode without dry-run: goals go through ArmBus.write_goals and the servos follow.
        wet = start_actuator(node_processes, config_path)
        wet.wait_ready(60)
        wait_for(lambda: np.max(np.abs(newest_position() - rest)) > 1.0, 120, interval_s=0.2,
                 message=f"the emulated servos never moved:\n{wet.log()[-3000:]}")
        # The emulator writes its counters twice a second.
        wait_for(lambda: emulator_sync_writes(config) > writes_before, 10, message="no sync write reached the bus")
        bus = control(config, "status").meta["bus"]["main"]
        assert bus["connected"] is True and bus["writes"] > 0
    finally:
        states.close()


# ----------------------------------------------------------------------------------------------------
# Lockstep (offline evaluation)
# ----------------------------------------------------------------------------------------------------


def test_lockstep_runs_row_j_of_the_chunk_from_frame_i_at_frame_i_plus_j(
        tmp_path: Path, node_processes: list[NodeProcess], slow_checkpoint: Path) -> None:
    # No step limit here, so the executed targets are the policy's rows themselves.
    config_path = slow_config(tmp_path, slow_checkpoint, {"dry_run": True, "lockstep": True, "auto_start": True,
                                                         "refill_rows": 0},
                              arms={"main": {"max_step": [1000.0] * 6}})
    config = load_config(config_path)
    tap = EventTap(config)
    feed = SensorFeed(config, position=np.array([0, -20, 20, 10, 0, 30], np.float32))
    try:
        start_policy(node_processes, config_path)
        actuator = start_actuator(node_processes, config_path).wait_ready(60)
        wait_for(lambda: control(config, "status").meta["state"] == "running", 30)
        # The tap hears the actuator (its once-a-second loop_stats) before any frame goes out, so no tick's
        # action can fall before the tap's subscription.
        wait_for(lambda: tap.events("loop_stats"), 30, message="the event tap never heard the actuator")
        frames = 12

        def acted(frame: int) -> bool:
            return any(m.meta["frame_index"] >= frame for m in tap.actions())

        for frame in range(frames):
            # Like the dataset player: frame k, then wait for its tick, and send frame k again if no tick
            # acknowledged it in time (PUB/SUB may drop a message; the player re-sends the same way).
            deadline = time.monotonic() + 60
            while not acted(frame):
                assert time.monotonic() < deadline, f"no action for frame {frame}:\n{actuator.log()[-3000:]}"
                feed.publish_once(frame_index=frame)
                resend_at = time.monotonic() + 15
                while not acted(frame) and time.monotonic() < resend_at:
                    time.sleep(0.05)
    finally:
        feed.close()
        tap.close()
    chunks = tap.events("chunk")
    assert [c.meta["obs_t"] for c in chunks] == [0.0, 8.0]  # a chunk of 8 rows, asked for when none is left
    assert all(c.meta["dropped_stale"] == 0 for c in chunks)
    by_frame = {m.meta["frame_index"]: m for m in tap.actions() if m.meta["frame_index"] >= 0}
    assert sorted(by_frame) == list(range(frames))
    for frame, action in by_frame.items():
        chunk = chunks[frame // 8].arrays["chunk"]
        assert action.meta["hold"] is False
        np.testing.assert_array_equal(action.arrays["action"], chunk[frame % 8])


# ----------------------------------------------------------------------------------------------------
# The schedule warning: a round trip longer than a chunk lasts
# ----------------------------------------------------------------------------------------------------


def test_a_round_trip_longer_than_a_chunk_is_said_once_on_the_event_stream_the_log_and_the_panel(
        tmp_path: Path, node_processes: list[NodeProcess], tiny_checkpoint: Any) -> None:
    # A real slow policy: 2 rows per chunk at 30 Hz (67 ms) and 100 DDIM steps on the CPU, a round trip of
    # several hundred ms on any machine. The actuator must say so once, not on every tick or chunk.
    small = {name: {"width": 64, "height": 64, "max_age_s": 3.0} for name in ("front", "wrist")}
    checkpoint_dir = tmp_path / "checkpoint"
    checkpoint_dir.mkdir()
    from common.tools.checkpoint_maker import build_checkpoint

    checkpoint = build_checkpoint(load_config(write_config(checkpoint_dir, "lift", {"cameras": small})),
                                  checkpoint_dir / "two-rows", policy_type="diffusion", size="tiny", chunk=2)
    config_path = write_config(tmp_path, "lift", {
        "cameras": small, "arms": {"main": {"max_state_age_s": 3.0}},
        "actuator": {"dry_run": True, "overlap": "replace", "max_chunk_age_s": 30.0},
        "policy": {"checkpoint": str(checkpoint), "timeout_s": 20.0, "num_inference_steps": 100, "warmup": 0}})
    config = load_config(config_path)
    tap = EventTap(config)
    feed = SensorFeed(config, hz=20, position=np.array([0, -20, 20, 10, 0, 30], np.float32)).start()
    monitor = NodeProcess("monitor", config_path).start()
    node_processes.append(monitor)
    try:
        start_policy(node_processes, config_path)
        actuator = start_actuator(node_processes, config_path)
        actuator.wait_ready(60)
        monitor.wait_ready(60)
        assert control(config, "start").meta["episode_index"] == 0
        warning = wait_for(lambda: tap.events("schedule"), 120, interval_s=0.1,
                           message=f"no schedule event:\n{actuator.log()[-3000:]}")[0]
        warned_t = time.monotonic()
        # Several seconds and several more slow chunks later, still that one event.
        wait_for(lambda: time.monotonic() - warned_t > 4.0 and len(tap.events("chunk", since=warning.t)) >= 4,
                 120, interval_s=0.2, message="the policy stopped answering")
        with urllib.request.urlopen(f"http://127.0.0.1:{config.monitor.port}/api/state", timeout=20) as reply:
            panel_log = json.loads(reply.read())["log"]
        control(config, "stop", label="success")
    finally:
        feed.close()
        tap.close()

    events = tap.events("schedule")
    assert len(events) == 1, [e.meta for e in events]
    meta = warning.meta
    assert meta["covered"] is False and meta["chunk_rows"] == 2 and meta["fps"] == 30.0
    chunk_s = 2 / 30
    assert meta["round_trip_p90_s"] > chunk_s and meta["inference_p90_s"] > 0
    message = meta["message"]
    assert f"{meta['round_trip_p90_s'] * 1000:.0f} ms" in message and "2 rows lasts 67 ms at 30 Hz" in message
    assert "policy.num_inference_steps" in message and "policy.rows: horizon" in message
    # Every chunk after it was as slow: the verdict never flipped back.
    assert all(c.meta["round_trip_s"] > chunk_s for c in tap.events("chunk"))
    assert actuator.log().count("the round trip is longer than a chunk lasts") == 1
    shown = [entry for entry in panel_log if entry["text"].startswith("schedule:")]
    assert len(shown) == 1 and shown[0]["level"] == "warn" and message in shown[0]["text"]


# ----------------------------------------------------------------------------------------------------
# Real-time chunking end to end
# ----------------------------------------------------------------------------------------------------


def test_rtc_chunks_start_with_the_rows_that_ran_and_are_guided_past_the_queue(
        tmp_path: Path, node_processes: list[NodeProcess], slow_checkpoint: Path) -> None:
    # overlap: rtc with the real policy: each request carries what ran and what is queued, then the previous
    # reply's guidance rows; each new chunk's frozen rows are the previous chunk's rows for those ticks.
    config_path = slow_config(tmp_path, slow_checkpoint, {"dry_run": True, "overlap": "rtc"})
    config = load_config(config_path)
    period = 1.0 / config.fps
    tap = EventTap(config)
    feed = SensorFeed(config, hz=10, position=np.array([0, -20, 20, 10, 0, 30], np.float32)).start()
    try:
        start_policy(node_processes, config_path)
        start_actuator(node_processes, config_path).wait_ready(60)
        assert control(config, "start").meta["episode_index"] == 0
        wait_for(lambda: len(tap.events("chunk")) >= 5, 120, interval_s=0.2, message="fewer than 5 chunks")
        control(config, "stop", label="success")
    finally:
        feed.close()
        tap.close()
    chunks = tap.events("chunk")
    guided = 0
    for position, (previous, chunk) in enumerate(itertools.pairwise(chunks), start=1):
        delay, sent = chunk.meta["rtc_delay_rows"], chunk.meta["rtc_prefix_rows"]
        assert sent >= delay >= 1
        new = chunk.arrays["chunk"]
        # Each frozen row is an earlier chunk's row for that slot (obs_t + k * period, within half a period): the
        # one that ran there or is queued for it. The observations are not on the ticks' grid, so it need not be
        # the previous chunk's (a slot between two of its rows may have run an older chunk's row).
        for k in range(delay):
            slot = chunk.meta["obs_t"] + k * period
            candidates = [row for c in chunks[:position] for j, row in enumerate(c.arrays["chunk"])
                          if abs(c.meta["obs_t"] + j * period - slot) < period / 2]
            assert any(np.allclose(new[k], row, rtol=0, atol=1e-3) for row in candidates), \
                f"chunk {position} row {k} is no earlier chunk's row for its slot"
        offset = round((chunk.meta["obs_t"] - previous.meta["obs_t"]) / period)
        guided += sent > len(previous.arrays["chunk"]) - offset  # more rows than the previous chunk had from obs_t on
        assert sent <= delay + config.actuator.rtc_soft_rows
    assert guided >= 1, [(c.meta["obs_t"], c.meta["rtc_prefix_rows"]) for c in chunks]
