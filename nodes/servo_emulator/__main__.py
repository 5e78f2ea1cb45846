"""Feetech STS3215 servo emulator: one SO-101 arm's bus on a pseudo-terminal.

    python -m nodes.servo_emulator --config configs/lift.yaml --name main

Opens a pseudo-terminal, links ``arms.<arm>.port`` to its slave side and answers the Feetech STS/SCS
protocol (protocol 0) for six STS3215 servos (ids 1..6), so that LeRobot's ``FeetechMotorsBus`` (and
``scservo_sdk`` under it) runs unmodified against it: ping, broadcast ping, read, write, reg write /
action, sync read and sync write, including everything connect, ``configure_motors``, calibration
reads/writes and torque enable/disable use.

The model: each servo keeps an STS control table (EEPROM + SRAM addresses as in the STS3215 manual).
With torque on, the present position follows the goal at ``emulator.speed_deg_s`` after
``emulator.lag_s``, limited to the Min/Max position limits, and reported relative to the homing offset
(``Present = Actual - Homing_Offset``, as on the real servo). Packets with a bad checksum, an
impossible length or that stop half-way are dropped without a reply, like a real servo, and counted;
a well-formed packet with an unknown instruction or bad parameters gets a status packet with the
instruction error bit (0x40). A servo only hears the line at its configured baud rate.

The EEPROM starts as the arm left the factory plus its calibration (``INITIAL_CALIBRATION``, keyed by
``robot_id``; ``configs/calibration/<robot_id>.json`` hold the same numbers), and the arm starts at
``arms.<arm>.rest_pose``. Counters go to ``<run_dir>/stats/servo_emulator-<arm>.json`` twice a second.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import sys
import termios
import threading
import time
import tty
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import SO101_JOINTS, ArmConfig, EmulatorConfig, parse_node_args
from common.node import Readiness, setup_logging
from common.wire.transport import stop_event_on_signals

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Protocol constants (Feetech protocol 0, as scservo_sdk speaks it)
# ---------------------------------------------------------------------------------------------------
HEADER = b"\xff\xff"
BROADCAST_ID = 0xFE
MAX_PACKET_LEN = 250  # the SDK's TXPACKET_MAX_LEN / RXPACKET_MAX_LEN
INST_PING = 0x01
INST_READ = 0x02
INST_WRITE = 0x03
INST_REG_WRITE = 0x04
INST_ACTION = 0x05
INST_SYNC_READ = 0x82
INST_SYNC_WRITE = 0x83
ERR_INSTRUCTION = 0x40  # status error bit: instruction or parameter error
TRUNCATED_AFTER_S = 0.02  # a packet whose remaining bytes do not arrive within this is dropped

# STS3215 control table: name -> (address, size). Kept independent of LeRobot's copy on purpose (this is
# the "hardware"); tests/test_servo_emulator.py checks the two agree.
REGISTERS: dict[str, tuple[int, int]] = {
    "Firmware_Major_Version": (0, 1),
    "Firmware_Minor_Version": (1, 1),
    "Model_Number": (3, 2),
    "ID": (5, 1),
    "Baud_Rate": (6, 1),
    "Return_Delay_Time": (7, 1),
    "Response_Status_Level": (8, 1),
    "Min_Position_Limit": (9, 2),
    "Max_Position_Limit": (11, 2),
    "Max_Temperature_Limit": (13, 1),
    "Max_Voltage_Limit": (14, 1),
    "Min_Voltage_Limit": (15, 1),
    "Max_Torque_Limit": (16, 2),
    "Phase": (18, 1),
    "Unloading_Condition": (19, 1),
    "LED_Alarm_Condition": (20, 1),
    "P_Coefficient": (21, 1),
    "D_Coefficient": (22, 1),
    "I_Coefficient": (23, 1),
    "Minimum_Startup_Force": (24, 2),
    "CW_Dead_Zone": (26, 1),
    "CCW_Dead_Zone": (27, 1),
    "Protection_Current": (28, 2),
    "Angular_Resolution": (30, 1),
    "Homing_Offset": (31, 2),
    "Operating_Mode": (33, 1),
    "Protective_Torque": (34, 1),
    "Protection_Time": (35, 1),
    "Overload_Torque": (36, 1),
    "Torque_Enable": (40, 1),
    "Acceleration": (41, 1),
    "Goal_Position": (42, 2),
    "Goal_Time": (44, 2),
    "Goal_Velocity": (46, 2),
    "Torque_Limit": (48, 2),
    "Lock": (55, 1),
    "Present_Position": (56, 2),
    "Present_Velocity": (58, 2),
    "Present_Load": (60, 2),
    "Present_Voltage": (62, 1),
    "Present_Temperature": (63, 1),
    "Status": (65, 1),
    "Moving": (66, 1),
    "Present_Current": (69, 2),
    "Maximum_Acceleration": (85, 1),
}
SIGN_BITS = {"Homing_Offset": 11, "Goal_Position": 15, "Goal_Velocity": 15, "Present_Position": 15,
             "Present_Velocity": 15, "Present_Load": 10}
TABLE_SIZE = 128
# Writes here are ignored (identity and measured values), as on the servo.
READ_ONLY = frozenset(range(0, 5)) | frozenset(range(56, 72))
STS3215_MODEL_NUMBER = 777
FIRMWARE_VERSION = (3, 10)
RESOLUTION = 4096
BAUD_RATES = {0: 1_000_000, 1: 500_000, 2: 250_000, 3: 128_000, 4: 115_200, 5: 57_600, 6: 38_400, 7: 19_200}

# Factory defaults of the STS3215 registers LeRobot touches (calibration registers come separately).
FACTORY_DEFAULTS: dict[str, int] = {
    "Firmware_Major_Version": FIRMWARE_VERSION[0],
    "Firmware_Minor_Version": FIRMWARE_VERSION[1],
    "Model_Number": STS3215_MODEL_NUMBER,
    "Baud_Rate": 0,
    "Return_Delay_Time": 250,
    "Response_Status_Level": 1,
    "Max_Temperature_Limit": 70,
    "Max_Voltage_Limit": 140,
    "Min_Voltage_Limit": 40,
    "Max_Torque_Limit": 1000,
    "Phase": 0x0C,
    "Unloading_Condition": 44,
    "LED_Alarm_Condition": 47,
    "P_Coefficient": 32,
    "D_Coefficient": 32,
    "I_Coefficient": 0,
    "Minimum_Startup_Force": 16,
    "CW_Dead_Zone": 1,
    "CCW_Dead_Zone": 1,
    "Protection_Current": 500,
    "Angular_Resolution": 1,
    "Operating_Mode": 0,
    "Protective_Torque": 20,
    "Protection_Time": 200,
    "Overload_Torque": 80,
    "Torque_Enable": 0,
    "Acceleration": 0,
    "Torque_Limit": 1000,
    "Lock": 0,
    "Present_Voltage": 120,
    "Present_Temperature": 31,
    "Maximum_Acceleration": 0,
}


@dataclass(frozen=True)
class ServoCalibration:
    """What LeRobot's calibration writes into a servo's EEPROM (drive mode is not a servo register)."""

    homing_offset: int
    range_min: int
    range_max: int


def _calibration(*rows: tuple[int, int, int]) -> dict[str, ServoCalibration]:
    return {joint: ServoCalibration(*row) for joint, row in zip(SO101_JOINTS, rows, strict=True)}


# Per-arm EEPROM calibration (homing_offset, range_min, range_max), joint order. The body joints span a
# little more than +-100 degrees around the middle of their range; wrist_roll is a full turn.
INITIAL_CALIBRATION: dict[str, dict[str, ServoCalibration]] = {
    "so101_main": _calibration((-1439, 733, 3435), (1330, 891, 3186), (-1110, 828, 3110),
                               (1318, 856, 3226), (-1421, 0, 4095), (1407, 2030, 3493)),
    "so101_left": _calibration((-1502, 760, 3411), (1289, 905, 3201), (-1075, 812, 3098),
                               (1350, 870, 3240), (-1390, 0, 4095), (1442, 2011, 3475)),
    "so101_right": _calibration((-1411, 721, 3447), (1361, 880, 3175), (-1139, 835, 3121),
                                (1296, 848, 3219), (-1455, 0, 4095), (1380, 2046, 3512)),
}
DEFAULT_ROBOT_ID = "so101_main"


def encode_sign_magnitude(value: int, sign_bit: int) -> int:
    magnitude = min(abs(value), (1 << sign_bit) - 1)
    return ((1 << sign_bit) if value < 0 else 0) | magnitude


def decode_sign_magnitude(raw: int, sign_bit: int) -> int:
    magnitude = raw & ((1 << sign_bit) - 1)
    return -magnitude if raw & (1 << sign_bit) else magnitude


def checksum(body: bytes | bytearray) -> int:
    """Feetech checksum over ID..last parameter: the inverted low byte of the sum."""
    return ~sum(body) & 0xFF


def status_packet(servo_id: int, error: int = 0, params: bytes = b"") -> bytes:
    body = bytes([servo_id, len(params) + 2, error]) + params
    return HEADER + body + bytes([checksum(body)])


def instruction_packet(servo_id: int, instruction: int, params: bytes = b"") -> bytes:
    """An instruction packet as the SDK builds it (used by tests and the bench)."""
    body = bytes([servo_id, len(params) + 2, instruction]) + params
    return HEADER + body + bytes([checksum(body)])


def ticks_for(position: float, joint: str, calibration: ServoCalibration, use_degrees: bool) -> float:
    """Present-frame servo ticks for a pose in LeRobot units (inverse of LeRobot's normalisation)."""
    low, high = calibration.range_min, calibration.range_max
    if joint == "gripper":
        return low + min(max(position, 0.0), 100.0) / 100.0 * (high - low)
    if use_degrees:
        return position * (RESOLUTION - 1) / 360.0 + (low + high) / 2
    return (min(max(position, -100.0), 100.0) + 100.0) / 200.0 * (high - low) + low


# ---------------------------------------------------------------------------------------------------
# One servo
# ---------------------------------------------------------------------------------------------------
class EmulatedServo:
    """An STS3215: control table plus a first-order motion model (speed limit and command lag)."""

    def __init__(self, servo_id: int, calibration: ServoCalibration, present_ticks: float,
                 motion: EmulatorConfig, now: float) -> None:
        self.table = bytearray(TABLE_SIZE)
        for name, value in FACTORY_DEFAULTS.items():
            self.set(name, value)
        self.set("ID", servo_id)
        self.set("Homing_Offset", calibration.homing_offset)
        self.set("Min_Position_Limit", calibration.range_min)
        self.set("Max_Position_Limit", calibration.range_max)
        self.speed_ticks_s = max(motion.speed_deg_s, 1e-6) * RESOLUTION / 360.0
        self.lag_s = max(motion.lag_s, 0.0)
        self.present = float(present_ticks)  # present frame (after the homing offset), fractional ticks
        self.target = self.present
        self.velocity = 0.0
        self.last_t = now
        self.pending_goals: deque[tuple[float, int]] = deque()
        self.registered: tuple[int, bytes] | None = None  # REG_WRITE waiting for ACTION
        self.set("Goal_Position", round(self.present))
        self.max_goal_step = 0
        self._refresh_measurements()

    @property
    def servo_id(self) -> int:
        return self.get("ID")

    @property
    def baud_rate(self) -> int | None:
        return BAUD_RATES.get(self.get("Baud_Rate"))

    # -- registers
    def get(self, name: str) -> int:
        address, size = REGISTERS[name]
        raw = int.from_bytes(self.table[address:address + size], "little")
        return decode_sign_magnitude(raw, SIGN_BITS[name]) if name in SIGN_BITS else raw

    def set(self, name: str, value: int) -> None:
        address, size = REGISTERS[name]
        raw = encode_sign_magnitude(int(value), SIGN_BITS[name]) if name in SIGN_BITS else int(value)
        self.table[address:address + size] = (raw & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def read(self, address: int, length: int, now: float) -> bytes | None:
        if address + length > TABLE_SIZE or length == 0:
            return None
        self.advance(now)
        self._refresh_measurements()
        return bytes(self.table[address:address + length])

    def write(self, address: int, data: bytes, now: float) -> bool:
        if address + len(data) > TABLE_SIZE or not data:
            return False
        self.advance(now)
        offset_before = self.get("Homing_Offset")
        torque_before = self.get("Torque_Enable")
        goal_before = self.get("Goal_Position")
        touched = range(address, address + len(data))
        for position, value in zip(touched, data, strict=True):
            if position not in READ_ONLY:
                self.table[position] = value
        goal_address = REGISTERS["Goal_Position"][0]
        if goal_address in touched or goal_address + 1 in touched:
            self.pending_goals.append((now + self.lag_s, self.get("Goal_Position")))
            # The largest jump between consecutive goals, in ticks: what a step limit looks like at the servo.
            self.max_goal_step = max(self.max_goal_step, abs(self.get("Goal_Position") - goal_before))
        offset_after = self.get("Homing_Offset")
        if offset_after != offset_before:
            # The shaft does not move: Present = Actual - Homing_Offset shifts instead.
            self.present += offset_before - offset_after
            self.target += offset_before - offset_after
        torque_after = self.get("Torque_Enable")
        if torque_after and not torque_before:
            # Torque on: drive to the goal register from now on.
            self.pending_goals.clear()
            self.target = float(self.get("Goal_Position"))
        elif torque_before and not torque_after:
            self.target = self.present
        self._refresh_measurements()
        return True

    # -- motion
    def advance(self, now: float) -> None:
        while self.pending_goals and self.pending_goals[0][0] <= now:
            effective, goal = self.pending_goals.popleft()
            self._integrate(effective)
            self.target = float(goal)
        self._integrate(now)

    def _integrate(self, until: float) -> None:
        dt = until - self.last_t
        if dt <= 0:
            return
        self.last_t = until
        if not self.get("Torque_Enable"):
            self.velocity = 0.0
            return
        low, high = self.get("Min_Position_Limit"), self.get("Max_Position_Limit")
        target = min(max(self.target, low), high) if low < high else self.target
        delta = target - self.present
        step = self.speed_ticks_s * dt
        if abs(delta) <= step:
            self.present = target
            self.velocity = 0.0
        else:
            self.present += step if delta > 0 else -step
            self.velocity = self.speed_ticks_s if delta > 0 else -self.speed_ticks_s

    def _refresh_measurements(self) -> None:
        present = round(self.present)
        if not self.get("Phase") & 0x10:
            present %= RESOLUTION  # angle feedback mode 0: readings wrap into 0..4095
        self.set("Present_Position", present)
        self.set("Present_Velocity", round(self.velocity))
        self.set("Moving", 1 if self.velocity != 0.0 else 0)


# ---------------------------------------------------------------------------------------------------
# The bus: packet framing, instructions, counters
# ---------------------------------------------------------------------------------------------------
class EmulatedBus:
    """Parses the byte stream from the host and returns the servos' reply bytes.

    ``line_baud()`` returns the baud rate the host set on the line (None: unknown, assume it matches);
    a servo configured for another rate does not hear the packet.
    """

    COUNTERS = ("packets", "replies", "checksum_errors", "length_errors", "truncated", "discarded_bytes",
                "bad_instructions", "bad_params", "wrong_baud", "replies_dropped")

    def __init__(self, servos: list[EmulatedServo], *, clock: Callable[[], float] = time.monotonic,
                 line_baud: Callable[[], int | None] = lambda: None) -> None:
        self.servos: dict[int, EmulatedServo] = {servo.servo_id: servo for servo in servos}
        self.clock = clock
        self.line_baud = line_baud
        self.buffer = bytearray()
        self.partial_since: float | None = None
        self._line: int | None = None
        self.counts: dict[str, int] = dict.fromkeys(self.COUNTERS, 0)
        self.instructions: dict[str, int] = {}

    @property
    def corrupt_packets(self) -> int:
        return self.counts["checksum_errors"] + self.counts["length_errors"] + self.counts["truncated"]

    def stats(self) -> dict[str, Any]:
        servos = {str(servo_id): {"torque": servo.get("Torque_Enable"), "goal": servo.get("Goal_Position"),
                                  "present": round(servo.present, 1), "max_goal_step": servo.max_goal_step}
                  for servo_id, servo in sorted(self.servos.items())}
        return {**self.counts, "corrupt_packets": self.corrupt_packets, "instructions": dict(self.instructions),
                "servos": servos}

    def feed(self, data: bytes) -> bytes:
        """Take bytes written by the host; return the bytes the servos send back."""
        now = self.clock()
        self._line = self.line_baud()  # one termios query per burst, not per servo
        self.buffer.extend(data)
        replies = bytearray()
        while True:
            start = self.buffer.find(HEADER)
            if start < 0:
                # Keep a trailing 0xFF: it may be the first half of the next header.
                keep = 1 if self.buffer.endswith(b"\xff") else 0
                self._discard(len(self.buffer) - keep)
                break
            if start:
                self._discard(start)
            if len(self.buffer) >= 3 and self.buffer[2] == 0xFF:
                self._discard(1)  # FF FF FF: the header is the last two
                continue
            if len(self.buffer) < 4:
                self._mark_partial(now)
                break
            length = self.buffer[3]
            if length < 2 or length > MAX_PACKET_LEN - 4:
                self.counts["length_errors"] += 1
                self._discard(2)
                continue
            total = length + 4
            if len(self.buffer) < total:
                self._mark_partial(now)
                break
            packet = bytes(self.buffer[:total])
            del self.buffer[:total]
            self.partial_since = None
            if packet[-1] != checksum(packet[2:-1]):
                self.counts["checksum_errors"] += 1
                continue
            self.counts["packets"] += 1
            replies += self._dispatch(packet[2], packet[4], packet[5:-1], now)
        return bytes(replies)

    def expire_partial(self) -> None:
        """Drop a packet whose tail never came (call periodically): a real servo times out the same way."""
        if self.partial_since is not None and self.clock() - self.partial_since > TRUNCATED_AFTER_S:
            self.counts["truncated"] += 1
            self.partial_since = None
            self._discard(2 if self.buffer.startswith(HEADER) else len(self.buffer))

    def _mark_partial(self, now: float) -> None:
        if self.partial_since is None:
            self.partial_since = now

    def _discard(self, count: int) -> None:
        if count > 0:
            self.counts["discarded_bytes"] += count
            del self.buffer[:count]

    def _listening(self, servo: EmulatedServo) -> bool:
        line = self._line
        if line is not None and servo.baud_rate is not None and line != servo.baud_rate:
            self.counts["wrong_baud"] += 1
            return False
        return True

    def _reply(self, servo: EmulatedServo, error: int = 0, params: bytes = b"", *, always: bool = False) -> bytes:
        # Response_Status_Level 0: the servo answers only PING and READ.
        if not always and servo.get("Response_Status_Level") == 0:
            return b""
        self.counts["replies"] += 1
        return status_packet(servo.servo_id, error, params)

    def _dispatch(self, target: int, instruction: int, params: bytes, now: float) -> bytes:
        replies = self._execute(target, instruction, params, now)
        if instruction in (INST_WRITE, INST_SYNC_WRITE, INST_ACTION):
            self.renumber()
        return replies

    def _execute(self, target: int, instruction: int, params: bytes, now: float) -> bytes:
        name = {INST_PING: "ping", INST_READ: "read", INST_WRITE: "write", INST_REG_WRITE: "reg_write",
                INST_ACTION: "action", INST_SYNC_READ: "sync_read", INST_SYNC_WRITE: "sync_write"}.get(instruction)
        self.instructions[name or f"0x{instruction:02x}"] = self.instructions.get(name or f"0x{instruction:02x}",
                                                                                  0) + 1
        broadcast = target == BROADCAST_ID
        if broadcast:
            addressed = [s for _, s in sorted(self.servos.items()) if self._listening(s)]
        else:
            servo = self.servos.get(target)
            addressed = [servo] if servo is not None and self._listening(servo) else []
        if instruction in (INST_SYNC_READ, INST_SYNC_WRITE):
            return self._sync(instruction, params, now) if broadcast else self._bad_params(addressed)
        if not addressed:
            return b""
        if instruction == INST_PING:
            return b"".join(self._reply(servo, always=True) for servo in addressed)
        if instruction == INST_READ:
            if broadcast or len(params) != 2:
                return self._bad_params(addressed)
            servo = addressed[0]
            data = servo.read(params[0], params[1], now)
            if data is None:
                self.counts["bad_params"] += 1
                return self._reply(servo, ERR_INSTRUCTION, bytes(params[1]), always=True)
            return self._reply(servo, 0, data, always=True)
        if instruction in (INST_WRITE, INST_REG_WRITE):
            if len(params) < 2:
                return self._bad_params(addressed)
            address, data = params[0], bytes(params[1:])
            replies = bytearray()
            for servo in addressed:
                if instruction == INST_REG_WRITE:
                    servo.registered = (address, data)
                    ok = address + len(data) <= TABLE_SIZE
                else:
                    ok = servo.write(address, data, now)
                if not ok:
                    self.counts["bad_params"] += 1
                if not broadcast:
                    replies += self._reply(servo, 0 if ok else ERR_INSTRUCTION)
            return bytes(replies)
        if instruction == INST_ACTION:
            for servo in addressed:
                if servo.registered is not None:
                    servo.write(*servo.registered, now)
                    servo.registered = None
            return b"" if broadcast else self._reply(addressed[0])
        self.counts["bad_instructions"] += 1
        return b"" if broadcast else self._reply(addressed[0], ERR_INSTRUCTION, always=True)

    def _bad_params(self, addressed: list[EmulatedServo]) -> bytes:
        self.counts["bad_params"] += 1
        if len(addressed) == 1:
            return self._reply(addressed[0], ERR_INSTRUCTION, always=True)
        return b""

    def _sync(self, instruction: int, params: bytes, now: float) -> bytes:
        if len(params) < 2:
            self.counts["bad_params"] += 1
            return b""
        address, length, rest = params[0], params[1], params[2:]
        replies = bytearray()
        if instruction == INST_SYNC_READ:
            for servo_id in rest:
                servo = self.servos.get(servo_id)
                if servo is None or not self._listening(servo):
                    continue
                data = servo.read(address, length, now)
                if data is None:
                    self.counts["bad_params"] += 1
                    replies += self._reply(servo, ERR_INSTRUCTION, bytes(length), always=True)
                else:
                    replies += self._reply(servo, 0, data, always=True)
            return bytes(replies)
        if length == 0 or len(rest) % (length + 1):
            self.counts["bad_params"] += 1
            return b""
        for index in range(0, len(rest), length + 1):
            servo = self.servos.get(rest[index])
            data = bytes(rest[index + 1:index + 1 + length])
            if servo is not None and self._listening(servo) and not servo.write(address, data, now):
                self.counts["bad_params"] += 1
        return b""

    def renumber(self) -> None:
        """Re-key servos whose ID register was written (LeRobot's setup_motor does that)."""
        self.servos = {servo.servo_id: servo for servo in self.servos.values()}


def build_arm(arm: ArmConfig, motion: EmulatorConfig, now: float) -> list[EmulatedServo]:
    """The six servos of one SO-101 arm, calibrated for ``arm.robot_id`` and resting at ``rest_pose``."""
    calibration = INITIAL_CALIBRATION.get(arm.robot_id)
    if calibration is None:
        log.warning("no emulator calibration for robot_id %r; using %s's", arm.robot_id, DEFAULT_ROBOT_ID)
        calibration = INITIAL_CALIBRATION[DEFAULT_ROBOT_ID]
    servos = []
    for index, joint in enumerate(SO101_JOINTS):
        cal = calibration[joint]
        if arm.rest_pose:
            ticks = ticks_for(arm.rest_pose[index], joint, cal, arm.use_degrees)
        else:
            ticks = (cal.range_min + cal.range_max) / 2
        servos.append(EmulatedServo(index + 1, cal, ticks, motion, now))
    return servos


# ---------------------------------------------------------------------------------------------------
# The pseudo-terminal
# ---------------------------------------------------------------------------------------------------
_TERMIOS_BAUD = {getattr(termios, f"B{rate}"): rate for rate in BAUD_RATES.values() if hasattr(termios, f"B{rate}")}


class PtyLink:
    """A pseudo-terminal whose slave is linked at ``port``; the emulator reads/writes the master side."""

    def __init__(self, port: Path) -> None:
        self.port = port
        if port.exists() and not port.is_symlink():
            raise FileExistsError(f"{port} exists and is not a symlink (a real serial device?); refusing to replace "
                                  "it. Point arms.<arm>.port at a free path for the emulator.")
        self.master, self.slave = os.openpty()
        # Raw mode: no echo, no line editing, no CR/LF translation - bytes pass through untouched.
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.slave_path = os.ttyname(self.slave)
        port.parent.mkdir(parents=True, exist_ok=True)
        temporary = port.with_name(f".{port.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        temporary.symlink_to(self.slave_path)
        temporary.replace(port)  # atomic: a stale link from a killed emulator is simply replaced

    def line_baud(self) -> int | None:
        """The baud rate the host configured on the slave side (None if it is not a standard rate)."""
        try:
            speed = termios.tcgetattr(self.slave)[5]
        except termios.error:
            return None
        return _TERMIOS_BAUD.get(speed)

    def read(self, timeout_s: float) -> bytes:
        ready, _, _ = select.select([self.master], [], [], timeout_s)
        if not ready:
            return b""
        try:
            return os.read(self.master, 4096)
        except BlockingIOError:
            return b""
        except OSError as exc:  # EIO: no slave open; we keep one open, but be tolerant
            if exc.errno == errno.EIO:
                return b""
            raise

    def write(self, data: bytes) -> int:
        """Write a reply; returns the bytes that did not fit (the host is not reading)."""
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.master, view)
            except BlockingIOError:
                return len(view)
            view = view[written:]
        return 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.port.is_symlink() and os.readlink(self.port) == self.slave_path:
                self.port.unlink()
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


def write_stats(path: Path, bus: EmulatedBus, extra: dict[str, Any]) -> None:
    payload = {**bus.stats(), **extra, "time": time.time()}
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload))
    temporary.replace(path)


def serve(link: PtyLink, bus: EmulatedBus, stop: threading.Event, stats_path: Path, *,
          stats_every_s: float = 0.5) -> None:
    next_stats = 0.0
    while not stop.is_set():
        timeout = TRUNCATED_AFTER_S / 2 if bus.partial_since is not None else 0.05
        data = link.read(timeout)
        if data:
            replies = bus.feed(data)
            if replies:
                dropped = link.write(replies)
                if dropped:
                    bus.counts["replies_dropped"] += 1
        bus.expire_partial()
        now = time.monotonic()
        if now >= next_stats:
            next_stats = now + stats_every_s
            write_stats(stats_path, bus, {"port": str(link.port), "pty": link.slave_path})


def main(argv: list[str] | None = None) -> int:
    args = parse_node_args("Feetech STS3215 servo emulator for one SO-101 arm (on a pseudo-terminal)", argv,
                           instance_of="arm")
    config, name = args.config, args.name
    program = f"servo_emulator-{name}"
    setup_logging(program)
    arm = config.arms[name]
    readiness = Readiness(config, program)
    stop = stop_event_on_signals()
    stats_dir = config.resolve(config.run_dir) / "stats"
    stats_dir.mkdir(parents=True, exist_ok=True)
    try:
        link = PtyLink(config.resolve(arm.port))
    except OSError as exc:
        log.error("arm %s: cannot create the emulated port: %s", name, exc)
        return 2
    bus = EmulatedBus(build_arm(arm, config.emulator, time.monotonic()), line_baud=link.line_baud)
    try:
        # Real servos answer within microseconds whatever the host is doing; on a busy machine a raised
        # priority keeps the emulator's replies inside the driver's 50 ms packet timeout. It sleeps in
        # select() between packets, so this costs other processes nothing.
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    except OSError:
        log.debug("cannot raise the emulator's priority (needs CAP_SYS_NICE); continuing at normal priority")
    stats_path = stats_dir / f"{program}.json"
    log.info("emulating %s (robot_id %s, 6 x STS3215) on %s -> %s", name, arm.robot_id, link.port, link.slave_path)
    write_stats(stats_path, bus, {"port": str(link.port), "pty": link.slave_path})
    readiness.ready(port=str(link.port), pty=link.slave_path, robot_id=arm.robot_id)
    try:
        serve(link, bus, stop, stats_path)
    finally:
        readiness.clear()
        write_stats(stats_path, bus, {"port": str(link.port), "pty": link.slave_path, "stopped": True})
        link.close()
        log.info("stopped; %s", json.dumps(bus.stats()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
