"""The emulated Feetech STS3215: protocol constants and packets (protocol 0, as ``scservo_sdk`` speaks it),
the control table (registers as data), factory defaults and per-arm calibration, and ``EmulatedServo``,
one servo's registers and motion model (the goal followed at ``emulator.speed_deg_s`` after
``emulator.lag_s``)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from common.config import SO101_JOINTS, EmulatorConfig

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
        # (time, goal before, goal after, torque on) of every Goal_Position write, while record_goals is on.
        self.record_goals = False
        self.goal_writes: deque[tuple[float, int, int, int]] = deque()
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
            if self.record_goals:
                self.goal_writes.append((now, goal_before, self.get("Goal_Position"), torque_before))
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
