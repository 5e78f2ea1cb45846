"""One SO-101 arm's Feetech servo bus, shared safely by several processes.

The state-reader and the actuator of an arm are separate, independently restartable processes that
open the SAME serial port. A Feetech bus is half-duplex: one request, then the servos' replies. If two
processes interleave their packets, a reader gets the other's replies (or a garbled mix). So every bus
transaction here - a sync read, a sync write, the connect handshake - runs while holding an OS lock
(``fcntl.flock`` on ``ArmConfig.bus_lock_path()``). The kernel drops the lock when a process dies, so a
killed node never wedges the bus.

The driver is LeRobot's own ``FeetechMotorsBus`` with the SO-101 follower's motor table and norm modes,
exactly as ``lerobot.robots.so_follower.SOFollower`` builds it, and calibration comes from LeRobot's
calibration JSON. Unlike ``SOFollower.connect`` this never prompts: a missing or mismatched calibration
is a ``CalibrationError``. Configuration writes (``SOFollower.configure``) are done only when a
register actually differs, inside one lock hold, so a second process connecting to an already
configured arm writes nothing and never drops torque under the other process's feet.

LeRobot's motor modules are imported without torch (see ``common.lerobot_lite``): the state-reader
and the actuator run on the robot computer and restart in about a second.

Units are LeRobot's: degrees for the five body joints (or -100..100 with ``use_degrees: false``),
0..100 for the gripper.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import termios
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import draccus
import numpy as np

from common import lerobot_lite

lerobot_lite.install()  # before the first lerobot import: the robot-side nodes never load torch
from lerobot.motors import Motor, MotorCalibration, MotorNormMode  # noqa: E402
from lerobot.motors.feetech import FeetechMotorsBus, OperatingMode, TorqueMode  # noqa: E402
from lerobot.utils.constants import HF_LEROBOT_CALIBRATION  # noqa: E402

from common.config import SO101_JOINTS, ArmConfig, resolve_repo_path  # noqa: E402

log = logging.getLogger(__name__)

T = TypeVar("T")

# SO-101 follower: servo ids 1..6 in joint order, all STS3215 (lerobot.robots.so_follower.SOFollower).
SO101_MOTOR_MODEL = "sts3215"
SO101_MOTOR_IDS: dict[str, int] = {joint: index + 1 for index, joint in enumerate(SO101_JOINTS)}

# What SOFollower.configure() and FeetechMotorsBus.configure_motors() write (LeRobot 0.6.1 defaults).
_CONFIG_ALL_MOTORS: dict[str, int] = {
    "Return_Delay_Time": 0,
    "Maximum_Acceleration": 254,
    "Acceleration": 254,
    "Operating_Mode": OperatingMode.POSITION.value,
    "P_Coefficient": 16,
    "I_Coefficient": 0,
    "D_Coefficient": 32,
}
_CONFIG_GRIPPER: dict[str, int] = {"Max_Torque_Limit": 500, "Protection_Current": 250, "Overload_Torque": 25}
_PHASE_ANGLE_FEEDBACK_BIT = 0x10
CONNECT_RETRIES = 5  # must be clear so positions stay in 0..4095 (see configure_motors)

# Where LeRobot keeps calibration files when arms.<arm>.calibration_dir is empty: the 0.6 robot name
# first, then the name older LeRobot versions (and most existing calibrations) used.
LEROBOT_CALIBRATION_DIRS = (
    HF_LEROBOT_CALIBRATION / "robots" / "so_follower",
    HF_LEROBOT_CALIBRATION / "robots" / "so101_follower",
)


class CalibrationError(RuntimeError):
    """The arm's calibration file is missing, unreadable, or does not match the servos."""


class BusLockTimeout(TimeoutError):
    """Another process held the bus longer than ``lock_timeout_s``."""


class BusTransactionError(ConnectionError):
    """A bus transaction failed on every attempt (no reply, or corrupt replies)."""


@dataclass
class BusStats:
    """Counters of one ArmBus (one process). ``corrupt`` is what the shared-bus tests require to stay 0."""

    reads: int = 0  # successful position reads
    writes: int = 0  # successful goal writes
    failed_attempts: int = 0  # attempts that failed (then retried or raised)
    corrupt: int = 0  # replies with a bad checksum / length ("Incorrect status packet")
    timeouts: int = 0  # no reply within the driver's packet timeout
    other_errors: int = 0  # port busy, tx failures, servo error bits
    lock_timeouts: int = 0
    lock_wait_max_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def so101_motors(use_degrees: bool = True) -> dict[str, Motor]:
    """The SO-101 follower's motor table, as SOFollower builds it."""
    body = MotorNormMode.DEGREES if use_degrees else MotorNormMode.RANGE_M100_100
    return {
        joint: Motor(motor_id, SO101_MOTOR_MODEL, MotorNormMode.RANGE_0_100 if joint == "gripper" else body)
        for joint, motor_id in SO101_MOTOR_IDS.items()
    }


def calibration_candidates(arm: ArmConfig) -> list[Path]:
    """Files tried, in order, for ``arm``'s calibration (``<dir>/<robot_id>.json``)."""
    if arm.calibration_dir:
        return [resolve_repo_path(arm.calibration_dir) / f"{arm.robot_id}.json"]
    return [directory / f"{arm.robot_id}.json" for directory in LEROBOT_CALIBRATION_DIRS]


def load_calibration(arm: ArmConfig) -> tuple[Path, dict[str, MotorCalibration]]:
    """Read the arm's LeRobot calibration JSON; a clear ``CalibrationError`` if missing or malformed."""
    candidates = calibration_candidates(arm)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        searched = ", ".join(str(p) for p in candidates)
        raise CalibrationError(
            f"no calibration file for robot_id `{arm.robot_id}` (searched: {searched}). armpipe never calibrates "
            "interactively: copy the arm's LeRobot calibration JSON there (LeRobot keeps it under "
            f"{HF_LEROBOT_CALIBRATION}/robots/so101_follower/), set arms.<arm>.calibration_dir / robot_id, or run "
            f"`lerobot-calibrate --robot.type=so101_follower --robot.port={arm.port} --robot.id={arm.robot_id}` once."
        )
    try:
        with path.open() as handle, draccus.config_type("json"):
            calibration = draccus.load(dict[str, MotorCalibration], handle)
    except Exception as exc:  # draccus/json raise assorted types for a bad file
        raise CalibrationError(f"calibration file {path} is not LeRobot calibration JSON: {exc}") from exc
    missing = [joint for joint in SO101_JOINTS if joint not in calibration]
    if missing:
        raise CalibrationError(f"calibration file {path}: missing motors {missing}; expected {list(SO101_JOINTS)}")
    for joint, motor_id in SO101_MOTOR_IDS.items():
        entry = calibration[joint]
        if entry.id != motor_id:
            raise CalibrationError(f"calibration file {path}: `{joint}.id` is {entry.id}, expected {motor_id} "
                                   "(the SO-101 motor table)")
        if entry.range_min >= entry.range_max:
            raise CalibrationError(f"calibration file {path}: `{joint}` has range_min {entry.range_min} >= "
                                   f"range_max {entry.range_max}")
    return path, {joint: calibration[joint] for joint in SO101_JOINTS}


def calibration_differences(expected: dict[str, MotorCalibration],
                            on_motors: dict[str, MotorCalibration]) -> list[str]:
    """Human-readable differences between a calibration file and what the servos hold."""
    differences = []
    for joint in SO101_JOINTS:
        want, got = expected[joint], on_motors.get(joint)
        if got is None:
            differences.append(f"{joint}: not read from the servos")
            continue
        for field_name in ("homing_offset", "range_min", "range_max"):
            if getattr(want, field_name) != getattr(got, field_name):
                differences.append(f"{joint}.{field_name}: file {getattr(want, field_name)}, "
                                   f"servo {getattr(got, field_name)}")
    return differences


class ArmBus:
    """LeRobot's Feetech driver for one SO-101 arm, with every transaction atomic across processes.

    ``read_positions`` / ``write_goals`` take and return float32 (6,) vectors in joint order
    (``joint_names``), in robot units. Methods are thread-safe within a process too.
    """

    def __init__(self, arm: ArmConfig, *, lock_timeout_s: float = 1.0, retries: int = 2, name: str = "") -> None:
        self.arm = arm
        self.name = name or arm.robot_id
        self.joint_names: list[str] = arm.joint_names()
        self.port = str(resolve_repo_path(arm.port))
        self.lock_path = Path(arm.bus_lock_path())
        self.lock_timeout_s = lock_timeout_s
        self.retries = max(0, retries)
        self.stats = BusStats()
        self.calibration_path: Path | None = None
        self._bus: FeetechMotorsBus | None = None
        self._lock_fd: int | None = None
        self._thread_lock = threading.RLock()
        self._torque_on = False
        self.last_read_time = 0.0  # time.monotonic() when the servos were sampled by the last read_positions
        self._connecting: FeetechMotorsBus | None = None  # the bus being connected (for _settle)

    # ------------------------------------------------------------------ connection
    @property
    def is_connected(self) -> bool:
        return self._bus is not None and self._bus.is_connected

    def connect(self) -> None:
        """Open the port, check the servos and their calibration, configure them if needed.

        Idempotent. Raises ``ConnectionError`` (no port, servos missing or not answering),
        ``CalibrationError`` (missing / mismatched calibration) or ``BusLockTimeout``.
        """
        with self._thread_lock:
            if self.is_connected:
                return
            if not os.path.exists(self.port):
                raise ConnectionError(
                    f"arm `{self.name}`: serial port {self.port} does not exist. Plug in the arm's controller board "
                    "and find its port with `lerobot-find-port` (then set arms.<arm>.port), or start the servo "
                    "emulator: python -m nodes.servo_emulator --config <deployment.yaml> --name <arm>")
            lock_path = Path(self.arm.bus_lock_path())  # follows the port's current real device
            if lock_path != self.lock_path and self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            self.lock_path = lock_path
            self.calibration_path, calibration = load_calibration(self.arm)
            bus = FeetechMotorsBus(port=self.port, motors=so101_motors(self.arm.use_degrees),
                                   calibration=calibration)
            # Connecting takes ~100 bus transactions; allow it more time than one read to get the lock.
            connect_timeout = max(self.lock_timeout_s, 10.0)
            self._connecting = bus
            try:
                # Opening the port flushes the shared input queue (pyserial), so even that is a transaction.
                with self._transaction("connect", bus=bus, timeout_s=connect_timeout, flush=False):
                    try:
                        bus.connect(handshake=False)
                        # LeRobot's handshake (ping every motor, compare model numbers and firmware), retried
                        # as a whole: one late reply on a busy machine must not fail the connection.
                        self._attempts(bus._handshake, "handshake")
                    except (ConnectionError, RuntimeError) as exc:
                        raise ConnectionError(f"arm `{self.name}` on {self.port}: {exc}".strip()) from exc
                with self._transaction("check calibration", bus=bus, timeout_s=connect_timeout):
                    on_motors = self._attempts(bus.read_calibration, "read calibration")
                    differences = calibration_differences(calibration, on_motors)
                    if differences:
                        raise CalibrationError(
                            f"arm `{self.name}`: calibration file {self.calibration_path} does not match the servos "
                            f"on {self.port}: {'; '.join(differences)}. The file may belong to another arm (check "
                            "arms.<arm>.robot_id and port) or the arm was recalibrated; armpipe never rewrites "
                            "servo calibration by itself - rerun `lerobot-calibrate` for this arm.")
                    self._configure_if_needed(bus)
                    self._torque_on = self._all_torque_on(bus)
            except BaseException:
                self._close_port(bus)
                raise
            finally:
                self._connecting = None
            self._bus = bus
            log.info("arm %s connected on %s (calibration %s, torque %s)", self.name, self.port,
                     self.calibration_path, "on" if self._torque_on else "off")

    def disconnect(self, *, disable_torque: bool = False) -> None:
        """Close the port. Torque stays as it is unless asked: a restarting node must not drop the arm."""
        with self._thread_lock:
            bus = self._bus
            if bus is None:
                return
            try:
                if disable_torque and bus.is_connected:
                    self.disable_torque()
            finally:
                # Closing sends nothing and leaves the shared input queue alone: no lock needed.
                self._close_port(bus)
                self._bus = None
                if self._lock_fd is not None:
                    os.close(self._lock_fd)
                    self._lock_fd = None

    # ------------------------------------------------------------------ data path
    def read_positions(self) -> np.ndarray:
        """Present positions of the six joints, float32 (6,), robot units; one sync read under the lock."""
        bus = self._connected_bus()

        def sync_read() -> dict[str, Any]:
            before = time.monotonic()
            values = bus.sync_read("Present_Position", num_retry=0)
            # The servos sample between request and reply: stamp the middle of the exchange.
            self.last_read_time = (before + time.monotonic()) / 2
            return values

        with self._transaction("read"):
            values = self._attempts(sync_read, "sync read")
        self.stats.reads += 1
        return np.array([values[joint] for joint in SO101_JOINTS], dtype=np.float32)

    def read_goals(self) -> np.ndarray:
        """The goal positions the servos hold now (``Goal_Position``), float32 (6,), robot units; one sync read
        under the lock. With torque on, this is the last goal each servo received, whoever wrote it."""
        bus = self._connected_bus()
        with self._transaction("read goals"):
            values = self._attempts(lambda: bus.sync_read("Goal_Position", num_retry=0), "sync read")
        return np.array([values[joint] for joint in SO101_JOINTS], dtype=np.float32)

    def write_goals(self, goals: np.ndarray) -> None:
        """Command goal positions, float32 (6,), robot units; one sync write under the lock.

        The first write after connecting switches torque on if it is off (after setting every goal to the
        present position, so enabling torque never makes the arm jump).
        """
        vector = np.asarray(goals, dtype=np.float64).reshape(-1)
        if vector.shape != (len(SO101_JOINTS),):
            raise ValueError(f"goals: expected {len(SO101_JOINTS)} values ({self.joint_names}), got shape "
                             f"{np.shape(goals)}")
        if not np.all(np.isfinite(vector)):
            bad = [self.joint_names[i] for i in np.flatnonzero(~np.isfinite(vector))]
            raise ValueError(f"goals: expected finite values, got NaN/inf for {bad}")
        bus = self._connected_bus()
        values = {joint: float(value) for joint, value in zip(SO101_JOINTS, vector, strict=True)}
        with self._transaction("write"):
            if not self._torque_on:
                self._enable_torque_locked(bus)
            try:
                self._attempts(lambda: bus.sync_write("Goal_Position", values, num_retry=0), "sync write")
            except ValueError as exc:  # a goal too far outside the calibrated range to encode
                raise ValueError(f"goals: {exc}") from exc
        self.stats.writes += 1

    # ------------------------------------------------------------------ torque
    @property
    def torque_enabled(self) -> bool:
        return self._torque_on

    def enable_torque(self) -> None:
        """Hold the present pose: goals := present positions, then torque on."""
        bus = self._connected_bus()
        with self._transaction("enable torque"):
            self._enable_torque_locked(bus)

    def disable_torque(self) -> None:
        bus = self._connected_bus()
        with self._transaction("disable torque"):
            self._attempts(lambda: bus.disable_torque(num_retry=1), "disable torque")
            self._torque_on = False

    def _enable_torque_locked(self, bus: FeetechMotorsBus) -> None:
        present = self._attempts(lambda: bus.sync_read("Present_Position", normalize=False, num_retry=0),
                                 "sync read")
        self._attempts(lambda: bus.sync_write("Goal_Position", present, normalize=False, num_retry=0), "sync write")
        self._attempts(lambda: bus.enable_torque(num_retry=1), "enable torque")
        self._torque_on = True
        log.info("arm %s: torque enabled at the present pose", self.name)

    def _all_torque_on(self, bus: FeetechMotorsBus) -> bool:
        states = self._attempts(lambda: bus.sync_read("Torque_Enable", normalize=False, num_retry=0), "sync read")
        return all(value == TorqueMode.ENABLED.value for value in states.values())

    # ------------------------------------------------------------------ configuration
    def _configure_if_needed(self, bus: FeetechMotorsBus) -> None:
        """SOFollower.configure(), but only when a register differs (called with the bus lock held)."""
        pending: list[tuple[str, str, int]] = []
        for joint in SO101_JOINTS:
            wanted = dict(_CONFIG_ALL_MOTORS)
            if joint == "gripper":
                wanted.update(_CONFIG_GRIPPER)
            for register, value in wanted.items():
                current = self._attempts(lambda r=register, j=joint: bus.read(r, j, normalize=False), "read")
                if current != value:
                    pending.append((register, joint, value))
            phase = self._attempts(lambda j=joint: bus.read("Phase", j, normalize=False), "read")
            if phase & _PHASE_ANGLE_FEEDBACK_BIT:
                pending.append(("Phase", joint, phase & ~_PHASE_ANGLE_FEEDBACK_BIT))
        if not pending:
            log.info("arm %s: servo configuration already in place; nothing written", self.name)
            return
        log.info("arm %s: configuring %d register(s) with torque off: %s", self.name, len(pending),
                 ", ".join(f"{joint}.{register}={value}" for register, joint, value in pending))
        torque_was_on = self._all_torque_on(bus)
        self._attempts(lambda: bus.disable_torque(num_retry=1), "disable torque")
        for register, joint, value in pending:
            self._attempts(lambda r=register, j=joint, v=value: bus.write(r, j, v, normalize=False), "write")
        if torque_was_on:
            self._enable_torque_locked(bus)

    # ------------------------------------------------------------------ locking and retries
    def _connected_bus(self) -> FeetechMotorsBus:
        bus = self._bus
        if bus is None or not bus.is_connected:
            raise ConnectionError(f"arm `{self.name}`: bus not connected; call connect() first")
        return bus

    def _lock_descriptor(self) -> int:
        if self._lock_fd is None:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        return self._lock_fd

    @contextmanager
    def _transaction(self, what: str, *, bus: FeetechMotorsBus | None = None, timeout_s: float | None = None,
                     flush: bool = True) -> Iterator[None]:
        """Hold the in-process lock and the OS bus lock for one transaction."""
        timeout = self.lock_timeout_s if timeout_s is None else timeout_s
        with self._thread_lock:
            fd = self._lock_descriptor()
            started = time.monotonic()
            pause = 0.0002
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                        raise
                if time.monotonic() - started > timeout:
                    self.stats.lock_timeouts += 1
                    raise BusLockTimeout(f"arm `{self.name}`: bus lock {self.lock_path} held by another process "
                                         f"for more than {timeout:.2f}s ({what})")
                time.sleep(pause)
                pause = min(pause * 2, 0.0005)
            self.stats.lock_wait_max_s = max(self.stats.lock_wait_max_s, time.monotonic() - started)
            try:
                target = bus or self._bus
                if flush and target is not None and target.is_connected:
                    # Bytes left by a transaction that gave up (late replies) must not be read as ours.
                    target.port_handler.is_using = False
                    try:
                        target.port_handler.ser.reset_input_buffer()
                    except (OSError, termios.error) as exc:
                        raise BusTransactionError(f"arm `{self.name}`: port {self.port} failed ({exc}); the "
                                                  "device is gone - reconnect") from exc
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                # Let a process waiting for the bus take it before this one, looping, takes it again.
                os.sched_yield()

    def _attempts(self, action: Callable[[], T], what: str) -> T:
        """Run one driver call with up to ``retries`` retries, classifying and counting each failure."""
        last: Exception | None = None
        # Connecting is rare and ~100 transactions long: tolerate more late replies there than per tick.
        retries = max(self.retries, CONNECT_RETRIES) if self._connecting is not None else self.retries
        for _ in range(1 + retries):
            try:
                return action()
            except ConnectionError as exc:  # the driver's "no / bad reply" errors: retry
                last = exc
            except RuntimeError as exc:  # a servo error bit
                last = exc
            except (OSError, termios.error) as exc:  # pyserial / termios: the port itself is gone
                self.stats.failed_attempts += 1
                self.stats.other_errors += 1
                raise BusTransactionError(f"arm `{self.name}`: port {self.port} failed during {what} ({exc}); "
                                          "the device is gone - reconnect") from exc
            self.stats.failed_attempts += 1
            text = str(last)
            if "Incorrect status packet" in text:
                self.stats.corrupt += 1
            elif "no status packet" in text:
                self.stats.timeouts += 1
            else:
                self.stats.other_errors += 1
            log.warning("arm %s: %s failed: %s", self.name, what, text.strip())
            self._settle()
        raise BusTransactionError(f"arm `{self.name}`: {what} failed after {1 + retries} attempt(s): "
                                  f"{str(last).strip()}") from last

    def _settle(self, quiet_s: float = 0.005, max_s: float = 0.1) -> None:
        """After a failed attempt, wait until the line is quiet, then drop whatever arrived late."""
        bus = self._bus or self._connecting
        port = bus.port_handler if bus is not None else None
        serial_port = getattr(port, "ser", None)
        if serial_port is None or not getattr(port, "is_open", False):
            return
        port.is_using = False
        deadline = time.monotonic() + max_s
        quiet_since = time.monotonic()
        try:
            while time.monotonic() < deadline:
                waiting = serial_port.in_waiting
                if waiting:
                    serial_port.read(waiting)
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= quiet_s:
                    break
                time.sleep(0.0005)
            serial_port.reset_input_buffer()
        except (OSError, termios.error) as exc:  # the port went away; the next attempt reports it
            log.debug("settling the bus failed: %s", exc)

    @staticmethod
    def _close_port(bus: FeetechMotorsBus) -> None:
        handler = bus.port_handler
        if handler.is_open:
            handler.closePort()

