"""state-reader node against the servo emulator: real processes, LeRobot's driver, ZeroMQ state stream."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
from conftest import NodeProcess, start_node, wait_for, write_config

from common.config import load_config
from common.wire.protocol import KIND_STATE, Message
from common.wire.transport import LatestSubscriber, SocketFactory


def collect_states(endpoint: str, seconds: float, *, at_least: int = 1, timeout_s: float = 30.0) -> list[Message]:
    """States received during ``seconds`` after the first one arrives."""
    subscriber = LatestSubscriber(SocketFactory(), [endpoint], hwm=10000)
    messages: list[Message] = []
    try:
        deadline = time.monotonic() + timeout_s
        while not messages and time.monotonic() < deadline:
            messages += subscriber.poll(0.1)
        end = time.monotonic() + seconds
        while time.monotonic() < end or len(messages) < at_least:
            messages += subscriber.poll(0.05)
            if time.monotonic() > deadline + seconds:
                break
    finally:
        subscriber.close()
    states = [m for m in messages if m.kind == KIND_STATE]
    assert len(states) >= at_least, f"got {len(states)} state messages"
    return states



def test_state_reader_publishes_named_positions_at_its_rate(tmp_path: Path,
                                                            node_processes: list[NodeProcess]) -> None:
    path = write_config(tmp_path, "lift", {"arms": {"main": {"read_hz": 50}}})
    config = load_config(path)
    arm = config.arms["main"]
    start_node(node_processes, path, "servo_emulator", "main")
    start_node(node_processes, path, "state_reader", "main")
    states = collect_states(arm.state_endpoint, 2.0, at_least=20)
    for state in states:
        assert state.meta["arm"] == "main"
        assert state.meta["names"] == arm.joint_names()
        assert state.meta["source"] == "robot"
        assert state.src == "state_reader-main"
        position = state.arrays["position"]
        assert position.dtype == np.float32 and position.shape == (6,)
        # The emulated arm rests at the configured rest pose (degrees; gripper 0..100).
        np.testing.assert_allclose(position, arm.rest_pose, atol=0.2)
    assert all(b.seq > a.seq and b.t > a.t for a, b in itertools.pairwise(states))
    assert states[-1].t <= time.monotonic()
    # Roughly the configured rate (a loose bound: the machine is shared).
    span = states[-1].t - states[0].t
    rate = (len(states) - 1) / span
    assert 0.5 * 50 < rate < 1.5 * 50, rate
    assert states[-1].meta["bus"]["corrupt"] == 0
    # A reader never touches torque (the emulator reports each servo's registers).
    since = time.time()
    stats_file = Path(config.run_dir) / "stats" / "servo_emulator-main.json"
    stats = wait_for(lambda: (s := json.loads(stats_file.read_text())) and s["time"] > since and s, 10.0)
    assert [servo["torque"] for servo in stats["servos"].values()] == [0] * 6


def test_two_arm_layout_publishes_prefixed_names(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    path = write_config(tmp_path, "sort")
    config = load_config(path)
    for arm in ("left", "right"):
        start_node(node_processes, path, "servo_emulator", arm)
    readers = [start_node(node_processes, path, "state_reader", arm, ready=False) for arm in ("left", "right")]
    for reader in readers:
        reader.wait_ready(120)
    for arm in ("left", "right"):
        states = collect_states(config.arms[arm].state_endpoint, 0.3, at_least=3)
        assert states[-1].meta["arm"] == arm
        assert states[-1].meta["names"] == [f"{arm}_{joint}.pos" for joint in
                                            ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex",
                                             "wrist_roll", "gripper")]


def test_missing_port_is_retried_until_the_bus_appears(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    path = write_config(tmp_path, "lift", {"arms": {"main": {"retry_s": 0.3}}})
    config = load_config(path)
    reader = start_node(node_processes, path, "state_reader", "main", ready=False)
    wait_for(lambda: "does not exist" in reader.log(), 60, message=reader.log())
    assert "lerobot-find-port" in reader.log() and "main" in reader.log()
    time.sleep(1.0)  # several retry periods: still up, not ready
    assert reader.proc is not None and reader.proc.poll() is None
    assert not reader.ready_path.exists()
    start_node(node_processes, path, "servo_emulator", "main")
    reader.wait_ready(30)
    assert collect_states(config.arms["main"].state_endpoint, 0.2, at_least=2)


def test_mismatched_calibration_is_a_clear_error_and_nothing_is_published(
        tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    # The emulated arm is so101_main; reading it with so101_left's calibration is the "swapped USB ports" case.
    path = write_config(tmp_path, "lift", {"arms": {"main": {"retry_s": 0.3}}})
    config = load_config(path)
    start_node(node_processes, path, "servo_emulator", "main")
    reader = start_node(node_processes, path, "state_reader", "main", args=["--arms.main.robot_id=so101_left"],
                   ready=False)
    wait_for(lambda: "does not match the servos" in reader.log(), 60, message=reader.log())
    log = reader.log()
    assert "so101_left.json" in log and "shoulder_pan.homing_offset: file -1502, servo -1439" in log
    subscriber = LatestSubscriber(SocketFactory(), [config.arms["main"].state_endpoint])
    try:
        assert subscriber.poll(1.0) == []
    finally:
        subscriber.close()
    assert reader.proc is not None and reader.proc.poll() is None and not reader.ready_path.exists()


def test_missing_calibration_file_names_where_it_looked(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    path = write_config(tmp_path, "lift", {"arms": {"main": {"retry_s": 0.3, "robot_id": "so101_unknown",
                                                            "calibration_dir": str(tmp_path / "calib")}}})
    start_node(node_processes, path, "servo_emulator", "main")
    reader = start_node(node_processes, path, "state_reader", "main", ready=False)
    wait_for(lambda: "no calibration file" in reader.log(), 60, message=reader.log())
    assert str(tmp_path / "calib" / "so101_unknown.json") in reader.log()
    assert "lerobot-calibrate" in reader.log()
    assert reader.proc is not None and reader.proc.poll() is None


def test_state_reader_recovers_when_the_bus_restarts(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    path = write_config(tmp_path, "lift", {"arms": {"main": {"retry_s": 0.3}}})
    config = load_config(path)
    emulator = start_node(node_processes, path, "servo_emulator", "main")
    reader = start_node(node_processes, path, "state_reader", "main")
    endpoint = config.arms["main"].state_endpoint
    assert collect_states(endpoint, 0.2, at_least=2)
    emulator.stop()  # the serial device goes away (unplugged controller, restarted emulator)
    wait_for(lambda: not reader.ready_path.exists(), 30, message=reader.log())
    start_node(node_processes, path, "servo_emulator", "main")
    reader.wait_ready(30)
    states = collect_states(endpoint, 0.3, at_least=3)
    np.testing.assert_allclose(states[-1].arrays["position"], config.arms["main"].rest_pose, atol=0.2)
    assert reader.proc is not None and reader.proc.poll() is None

