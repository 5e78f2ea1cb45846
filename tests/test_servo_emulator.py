"""Servo emulator: LeRobot's unmodified Feetech driver against the real emulator process on a pty,
plus the packet-level behaviour (checksums, truncation, error bits) and the motion model."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import serial
from conftest import REPO_ROOT, NodeProcess, wait_for, write_config

from common.config import EmulatorConfig, load_config
from common.feetech_bus import SO101_MOTOR_IDS, load_calibration, resolve_repo_path, so101_motors
from nodes.servo_emulator.bus import EmulatedBus, build_arm
from nodes.servo_emulator.sts3215 import (
    BROADCAST_ID,
    ERR_INSTRUCTION,
    INITIAL_CALIBRATION,
    INST_PING,
    INST_READ,
    INST_SYNC_READ,
    INST_WRITE,
    REGISTERS,
    EmulatedServo,
    ServoCalibration,
    instruction_packet,
    status_packet,
)

JOINTS = list(SO101_MOTOR_IDS)


def start_emulator(tmp_path: Path, procs: list[NodeProcess], *, task: str = "lift", arm: str = "main",
                   overrides: dict | None = None) -> tuple[Path, NodeProcess]:
    path = write_config(tmp_path, task, overrides)
    node = NodeProcess("servo_emulator", path, name=arm).start()
    procs.append(node)
    node.wait_ready(30)
    return path, node


def emulator_stats(path: Path, arm: str = "main") -> dict:
    run_dir = Path(load_config(path).run_dir)
    stats_file = run_dir / "stats" / f"servo_emulator-{arm}.json"
    return json.loads(stats_file.read_text())


def fresh_stats(path: Path, arm: str = "main") -> dict:
    """Stats written after this call (the emulator rewrites them twice a second)."""
    since = time.time()
    return wait_for(lambda: (s := emulator_stats(path, arm)) and s["time"] > since + 0.05 and s, 10.0)


def lerobot_bus(path: Path, arm: str = "main"):
    """LeRobot's FeetechMotorsBus for the SO-101, exactly as the driver ships."""
    from lerobot.motors.feetech import FeetechMotorsBus

    config = load_config(path).arms[arm]
    _, calibration = load_calibration(config)
    return FeetechMotorsBus(port=str(resolve_repo_path(config.port)), motors=so101_motors(), calibration=calibration)


# ------------------------------------------------------------------------------------------------ driver
def test_lerobot_driver_connects_reads_and_writes(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    path, _ = start_emulator(tmp_path, node_processes, overrides={"emulator": {"speed_deg_s": 720, "lag_s": 0.0}})
    bus = lerobot_bus(path)
    bus.connect(handshake=True)  # pings every motor, reads model numbers and firmware versions
    try:
        assert bus.broadcast_ping() == dict.fromkeys(range(1, 7), 777)
        assert bus.ping("gripper") == 777
        assert bus.read("Firmware_Major_Version", "elbow_flex", normalize=False) == 3
        # Calibration registers hold what the shipped calibration file says.
        assert bus.is_calibrated
        # configure_motors: single writes with status replies, and the Phase read-modify-write.
        bus.configure_motors()
        assert bus.sync_read("Return_Delay_Time", normalize=False) == dict.fromkeys(JOINTS, 0)
        assert bus.read("Acceleration", "wrist_roll", normalize=False) == 254
        bus.write("P_Coefficient", "shoulder_pan", 16)
        assert bus.read("P_Coefficient", "shoulder_pan", normalize=False) == 16
        # Sync write of goals moves the joints only with torque on.
        start = bus.sync_read("Present_Position")
        goals = {joint: value + (5.0 if joint != "gripper" else 10.0) for joint, value in start.items()}
        bus.disable_torque()
        bus.sync_write("Goal_Position", goals)
        time.sleep(0.2)
        assert bus.sync_read("Present_Position") == start
        bus.enable_torque()
        reached = wait_for(lambda: (now := bus.sync_read("Present_Position"))
                           and all(abs(now[j] - goals[j]) < 0.5 for j in JOINTS) and now, 5.0)
        assert reached != start
        # Calibration write/read round trip (what lerobot-calibrate does).
        original = bus.read_calibration()
        changed = {j: type(c)(c.id, c.drive_mode, c.homing_offset + 10, c.range_min, c.range_max)
                   for j, c in original.items()}
        bus.write_calibration(changed, cache=False)
        assert bus.read_calibration() == changed
        bus.write_calibration(original)
        assert bus.is_calibrated
    finally:
        bus.disconnect(disable_torque=True)
    stats = fresh_stats(path)
    assert stats["corrupt_packets"] == 0 and stats["bad_params"] == 0
    assert {"ping", "read", "write", "sync_read", "sync_write"} <= set(stats["instructions"])


def test_present_position_follows_goal_at_limited_speed(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    path, _ = start_emulator(tmp_path, node_processes, overrides={"emulator": {"speed_deg_s": 60, "lag_s": 0.05}})
    bus = lerobot_bus(path)
    bus.connect()
    try:
        bus.enable_torque()
        start = bus.read("Present_Position", "shoulder_pan")
        bus.write("Goal_Position", "shoulder_pan", start + 30.0)  # 0.5 s at 60 deg/s
        samples = []
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            samples.append(bus.read("Present_Position", "shoulder_pan"))
            if abs(samples[-1] - (start + 30.0)) < 0.2:
                break
            time.sleep(0.02)
        assert abs(samples[-1] - (start + 30.0)) < 0.2, samples
        # It went through intermediate positions, monotonically, instead of jumping.
        intermediate = [s for s in samples if start + 1.0 < s < start + 29.0]
        assert len(intermediate) >= 3, samples
        assert samples == sorted(samples)
    finally:
        bus.disconnect(disable_torque=True)


def test_wrong_baud_rate_gets_no_answer(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    path, _ = start_emulator(tmp_path, node_processes)
    bus = lerobot_bus(path)
    bus.connect(handshake=False)
    try:
        bus.set_baudrate(500_000)
        assert bus.ping("shoulder_pan") is None
        bus.set_baudrate(1_000_000)
        assert bus.ping("shoulder_pan") == 777
    finally:
        bus.disconnect(disable_torque=False)
    assert fresh_stats(path)["wrong_baud"] >= 1


def test_corrupt_and_truncated_packets_get_no_reply_and_are_counted(tmp_path: Path,
                                                                      node_processes: list[NodeProcess]) -> None:
    path, _ = start_emulator(tmp_path, node_processes)
    port = str(resolve_repo_path(load_config(path).arms["main"].port))
    with serial.Serial(port, 1_000_000, timeout=0.3) as line:
        good = instruction_packet(1, INST_PING)
        line.write(good)
        assert line.read(6) == status_packet(1)
        bad_checksum = good[:-1] + bytes([good[-1] ^ 0x5A])
        line.write(bad_checksum)
        assert line.read(6) == b""
        line.write(instruction_packet(2, INST_READ, bytes([56, 2]))[:5])  # stops half-way
        assert line.read(8) == b""
        line.write(instruction_packet(3, 0x7E))  # well-formed, unknown instruction: error bit
        assert line.read(6) == status_packet(3, ERR_INSTRUCTION)
    stats = fresh_stats(path)
    assert stats["checksum_errors"] == 1 and stats["truncated"] == 1 and stats["bad_instructions"] == 1
    assert stats["corrupt_packets"] == 2


def test_two_emulators_for_the_sort_layout(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    path = write_config(tmp_path, "sort")
    for arm in ("left", "right"):
        node = NodeProcess("servo_emulator", path, name=arm).start()
        node_processes.append(node)
    for node in node_processes:
        node.wait_ready(30)
    for arm in ("left", "right"):
        bus = lerobot_bus(path, arm)
        bus.connect()
        try:
            assert bus.is_calibrated, arm  # each arm answers with its own calibration
        finally:
            bus.disconnect(disable_torque=False)


def test_emulator_refuses_to_replace_a_real_device_path(tmp_path: Path) -> None:
    path = write_config(tmp_path, "lift")
    port = resolve_repo_path(load_config(path).arms["main"].port)
    port.write_text("not a symlink")
    node = NodeProcess("servo_emulator", path, name="main").start()
    assert node.proc is not None and node.proc.wait(timeout=60) == 2
    assert "not a symlink" in node.log()
    assert port.read_text() == "not a symlink"
    node.stop()


# ------------------------------------------------------------------------------------------------ packets
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_bus(clock: FakeClock, speed_deg_s: float = 90.0, lag_s: float = 0.1) -> EmulatedBus:
    motion = EmulatorConfig(speed_deg_s=speed_deg_s, lag_s=lag_s)
    cal = ServoCalibration(0, 0, 4095)
    return EmulatedBus([EmulatedServo(i, cal, 2048, motion, clock()) for i in (1, 2, 3)], clock=clock)


def test_sync_read_answers_in_requested_order_and_skips_missing_ids() -> None:
    clock = FakeClock()
    bus = make_bus(clock)
    reply = bus.feed(instruction_packet(BROADCAST_ID, INST_SYNC_READ, bytes([56, 2, 3, 9, 1])))
    position = (2048).to_bytes(2, "little")
    assert reply == status_packet(3, 0, position) + status_packet(1, 0, position)


def test_packets_split_across_reads_are_reassembled_and_garbage_is_skipped() -> None:
    clock = FakeClock()
    bus = make_bus(clock)
    packet = instruction_packet(2, INST_READ, bytes([3, 2]))
    assert bus.feed(b"\x00\x13" + packet[:4]) == b""
    assert bus.feed(packet[4:]) == status_packet(2, 0, (777).to_bytes(2, "little"))
    assert bus.counts["discarded_bytes"] == 2 and bus.corrupt_packets == 0


def test_truncated_packet_expires_and_the_next_one_is_served() -> None:
    clock = FakeClock()
    bus = make_bus(clock)
    assert bus.feed(instruction_packet(1, INST_READ, bytes([56, 2]))[:6]) == b""
    clock.now += 0.1
    bus.expire_partial()
    assert bus.counts["truncated"] == 1
    assert bus.feed(instruction_packet(1, INST_PING)) == status_packet(1)


def test_read_past_the_table_sets_the_error_bit() -> None:
    bus = make_bus(FakeClock())
    reply = bus.feed(instruction_packet(1, INST_READ, bytes([127, 4])))
    assert reply == status_packet(1, ERR_INSTRUCTION, bytes(4))


def test_motion_model_lag_then_speed_limit_then_position_limits() -> None:
    clock = FakeClock()
    bus = make_bus(clock, speed_deg_s=90.0, lag_s=0.1)
    servo = bus.servos[1]
    bus.feed(instruction_packet(1, INST_WRITE, bytes([REGISTERS["Torque_Enable"][0], 1])))
    goal = 2048 + 1024  # 90 degrees away
    bus.feed(instruction_packet(1, INST_WRITE, bytes([REGISTERS["Goal_Position"][0]]) + goal.to_bytes(2, "little")))
    clock.now += 0.09
    servo.advance(clock.now)
    assert servo.present == 2048  # still within the lag
    clock.now += 0.51  # 0.5 s of motion at 1024 ticks/s
    servo.advance(clock.now)
    assert servo.present == pytest.approx(2048 + 512, abs=1e-6)
    clock.now += 1.0
    servo.advance(clock.now)
    assert servo.present == goal
    # Goals beyond the Max_Position_Limit stop at the limit.
    servo.set("Max_Position_Limit", 3200)
    bus.feed(instruction_packet(1, INST_WRITE, bytes([REGISTERS["Goal_Position"][0]]) + (4000).to_bytes(2, "little")))
    clock.now += 2.0
    servo.advance(clock.now)
    assert servo.present == 3200


def test_homing_offset_shifts_present_position_not_the_shaft() -> None:
    clock = FakeClock()
    bus = make_bus(clock)
    offset_address = REGISTERS["Homing_Offset"][0]
    bus.feed(instruction_packet(1, INST_WRITE, bytes([offset_address]) + (100).to_bytes(2, "little")))
    assert bus.servos[1].get("Present_Position") == 2048 - 100
    # Negative offsets are sign-magnitude (bit 11), as LeRobot encodes them.
    bus.feed(instruction_packet(1, INST_WRITE, bytes([offset_address]) + ((1 << 11) | 50).to_bytes(2, "little")))
    assert bus.servos[1].get("Homing_Offset") == -50
    assert bus.servos[1].get("Present_Position") == 2048 + 50


# ------------------------------------------------------------------------------------------------ tables
def test_emulator_control_table_matches_lerobot() -> None:
    from lerobot.motors.feetech.tables import MODEL_CONTROL_TABLE, MODEL_NUMBER_TABLE

    table = MODEL_CONTROL_TABLE["sts3215"]
    for name, address in REGISTERS.items():
        assert table[name] == address, name
    assert int.from_bytes(EmulatedServo(1, ServoCalibration(0, 0, 4095), 0, EmulatorConfig(), 0.0).table[3:5],
                          "little") == MODEL_NUMBER_TABLE["sts3215"]


def test_shipped_calibration_files_match_the_emulated_arms() -> None:
    for robot_id, calibration in INITIAL_CALIBRATION.items():
        data = json.loads((REPO_ROOT / "configs" / "calibration" / f"{robot_id}.json").read_text())
        assert list(data) == JOINTS
        for joint, motor_id in SO101_MOTOR_IDS.items():
            entry = data[joint]
            assert entry["id"] == motor_id and entry["drive_mode"] == 0
            assert (entry["homing_offset"], entry["range_min"], entry["range_max"]) == (
                calibration[joint].homing_offset, calibration[joint].range_min, calibration[joint].range_max)


def test_arms_start_at_their_rest_pose() -> None:
    config = load_config(REPO_ROOT / "configs" / "lift.yaml")
    arm = config.arms["main"]
    servos = build_arm(arm, config.emulator, 0.0)
    cal = INITIAL_CALIBRATION[arm.robot_id]
    for servo, joint, pose in zip(servos, JOINTS, arm.rest_pose, strict=True):
        low, high = cal[joint].range_min, cal[joint].range_max
        if joint == "gripper":
            reported = (servo.present - low) / (high - low) * 100
        else:
            reported = (servo.present - (low + high) / 2) * 360 / 4095
        assert reported == pytest.approx(pose, abs=0.1)
    assert os.path.basename(arm.port) == "so101_main.tty"
