"""state-reader: publishes one arm's joint positions at a fixed rate.

    python -m nodes.state_reader --config configs/lift.yaml --name main

Reads ``Present_Position`` of the arm's six servos through LeRobot's Feetech driver (``common.feetech_bus
.ArmBus``: every transaction under the bus's OS lock, shared with the actuator) at ``arms.<arm>.read_hz``
and publishes ``state`` messages on ``arms.<arm>.state_endpoint`` (docs/architecture.md#streams): meta
``arm``, ``names`` (prefixed joint names), ``source: "robot"``, ``bus`` (this process's bus counters);
array ``position`` float32 (6,) in robot units; ``t`` = when the servos were sampled (monotonic clock).

A missing port, servos that do not answer or a bad calibration are logged and retried every
``arms.<arm>.retry_s``; the node stays up (not ready) instead of crash-looping. It never writes goals
and never changes torque.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from common.config import ArmConfig
from common.feetech_bus import ArmBus, BusLockTimeout, BusTransactionError, CalibrationError
from common.node import Readiness, start_node
from common.wire.protocol import KIND_STATE, Message
from common.wire.transport import Publisher, SocketFactory

log = logging.getLogger(__name__)

SOURCE = "robot"
# Consecutive failed reads after which the port is closed and reopened (an unplugged cable, a restarted
# emulator behind the same path).
REOPEN_AFTER_FAILURES = 10
LOG_REPEAT_S = 30.0


class StateReader:
    """The read loop of one arm; ``run`` returns when ``stop`` is set."""

    def __init__(self, name: str, arm: ArmConfig, publisher: Publisher, readiness: Readiness,
                 stop: threading.Event) -> None:
        self.name = name
        self.arm = arm
        self.publisher = publisher
        self.readiness = readiness
        self.stop = stop
        self.bus = ArmBus(arm, name=name, lock_timeout_s=min(0.5, 2.0 / arm.read_hz + 0.1))
        self.names = arm.joint_names()
        self.period = 1.0 / arm.read_hz
        self.overruns = 0  # ticks started later than one period after their schedule
        self._last_error = ""
        self._last_error_logged = 0.0

    def run(self) -> None:
        while not self.stop.is_set():
            if not self._connect():
                self.stop.wait(self.arm.retry_s)
                continue
            self.readiness.ready(arm=self.name, port=self.bus.port, endpoint=self.arm.state_endpoint,
                                 read_hz=self.arm.read_hz, calibration=str(self.bus.calibration_path))
            self._read_loop()
            self.readiness.clear()
            self.close()

    def _connect(self) -> bool:
        try:
            self.bus.connect()
        except (ConnectionError, CalibrationError, BusLockTimeout, OSError) as exc:
            self._log_error(f"arm `{self.name}` not available ({type(exc).__name__}): {exc}".rstrip()
                            + f"; retrying every {self.arm.retry_s:g}s")
            self.close()
            return False
        self._last_error = ""
        return True

    def _read_loop(self) -> None:
        failures = 0
        next_tick = time.monotonic()
        while not self.stop.is_set():
            try:
                position = self.bus.read_positions()
            except BusLockTimeout as exc:
                # Another process (an actuator connecting) holds the bus: skip this tick, our port is fine.
                self._log_error(f"arm `{self.name}`: read skipped: {exc}")
            except (BusTransactionError, OSError) as exc:
                failures += 1
                self._log_error(f"arm `{self.name}`: read failed ({type(exc).__name__}): {exc}")
                if failures >= REOPEN_AFTER_FAILURES:
                    log.error("arm %s: %d reads in a row failed; reopening the port", self.name, failures)
                    return
            else:
                failures = 0
                self.publisher.publish(Message(
                    kind=KIND_STATE, t=self.bus.last_read_time,
                    meta={"arm": self.name, "names": self.names, "source": SOURCE,
                          "bus": self._bus_counters()},
                    arrays={"position": position}))
            next_tick += self.period
            delay = next_tick - time.monotonic()
            if delay < -self.period:
                self.overruns += 1
                next_tick = time.monotonic()  # fell behind: restart the schedule instead of bursting
            elif delay > 0:
                self.stop.wait(delay)

    def _bus_counters(self) -> dict[str, int]:
        stats = self.bus.stats
        return {"reads": stats.reads, "failed_attempts": stats.failed_attempts, "corrupt": stats.corrupt,
                "timeouts": stats.timeouts, "lock_timeouts": stats.lock_timeouts, "overruns": self.overruns}

    def _log_error(self, text: str) -> None:
        now = time.monotonic()
        if text != self._last_error or now - self._last_error_logged > LOG_REPEAT_S:
            log.error("%s", text)
            self._last_error, self._last_error_logged = text, now

    def close(self) -> None:
        try:
            self.bus.disconnect()  # never touches torque: the actuator may be holding the arm
        except Exception as exc:  # closing a dead port may fail in assorted ways; we reopen anyway
            log.debug("closing the bus failed: %s", exc)
            stats = self.bus.stats
            self.bus = ArmBus(self.arm, name=self.name, lock_timeout_s=self.bus.lock_timeout_s)
            self.bus.stats = stats


def main(argv: list[str] | None = None) -> int:
    started = start_node("state_reader", "state-reader: publish one arm's joint positions", argv, instance_of="arm")
    name, readiness = started.name, started.readiness
    arm = started.config.arms[name]
    factory = SocketFactory()
    publisher = Publisher(factory, arm.state_endpoint, started.program)
    reader = StateReader(name, arm, publisher, readiness, started.stop)
    log.info("reading arm %s on %s at %g Hz -> %s", name, arm.port, arm.read_hz, arm.state_endpoint)
    try:
        reader.run()
    finally:
        readiness.clear()
        reader.close()
        publisher.close()
        log.info("stopped; bus counters %s", reader.bus.stats.as_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
