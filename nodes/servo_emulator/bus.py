"""The emulated bus: packet framing, the instructions (ping, read, write, reg write / action, sync read and
write), broadcast and baud rate handling, corrupt-packet counters; and ``build_arm``, one SO-101 arm's six
servos."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from common.config import SO101_JOINTS, ArmConfig, EmulatorConfig
from nodes.servo_emulator.sts3215 import (
    BROADCAST_ID,
    DEFAULT_ROBOT_ID,
    ERR_INSTRUCTION,
    HEADER,
    INITIAL_CALIBRATION,
    INST_ACTION,
    INST_PING,
    INST_READ,
    INST_REG_WRITE,
    INST_SYNC_READ,
    INST_SYNC_WRITE,
    INST_WRITE,
    MAX_PACKET_LEN,
    TABLE_SIZE,
    TRUNCATED_AFTER_S,
    EmulatedServo,
    checksum,
    status_packet,
    ticks_for,
)

log = logging.getLogger(__name__)

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
