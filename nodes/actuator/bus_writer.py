"""The actuator's bus writers: one thread per arm, so bus contention never delays a tick."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

import numpy as np

from common.config import DeploymentConfig
from nodes.actuator.core import JOINTS_PER_ARM
from nodes.actuator.pacer import MIN_GAP

log = logging.getLogger("actuator")

BUS_RETRY_S = 1.0


class BusWriter(threading.Thread):
    """Writes the newest target of one arm through ``common.feetech_bus.ArmBus``; reconnects on failure.

    The last line of the step limit: every goal it writes is within ``arms.<arm>.max_step`` of the goal the
    servos last received (``sent``: read back from the servos after each connect, then tracked), whatever
    happened between two writes (the bus lock held elsewhere, a stalled thread, a hold, an episode start, a
    restart of the actuator). A target further away is written one ``max_step`` closer, and the writer keeps
    catching up, one step per control period, until it is reached or a newer target replaces it.
    """

    def __init__(self, arm_name: str, config: DeploymentConfig, stop: threading.Event) -> None:
        super().__init__(name=f"bus-{arm_name}", daemon=True)
        self.arm_name = arm_name
        self.arm = config.arms[arm_name]
        self.stop_event = stop
        self.period = 1.0 / config.fps
        self.max_step = np.asarray(self.arm.max_step, dtype=np.float64)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._target: np.ndarray | None = None
        self._tag: int | None = None
        # The goal the servos last received (robot units); None after a (re)connect until read back from them.
        self.sent: np.ndarray | None = None
        self._behind: np.ndarray | None = None  # a target the last write fell short of (step-limited)
        self._last_write = 0.0
        self._last_start = -1.0  # when the last write began: the next begins MIN_GAP of a period later at the soonest
        # (tick, monotonic time) of every tagged goal whose write returned; the loop drains it (deque
        # append/popleft are atomic, so no lock is needed between the two threads).
        self.written: collections.deque[tuple[int, float]] = collections.deque(maxlen=1024)
        self.connected = False
        self.last_error = ""
        self.writes = 0
        self.limited_writes = 0  # writes shortened to max_step from the servos' last goal (catching up)
        self._catching_up = False
        # Present_Position read through this writer's own bus for an episode (generation) that asked for it:
        # the episode's step limit starts there, not at whatever the state stream says.
        self._present_wanted: int | None = None
        self._present: tuple[int, np.ndarray] | None = None

    @property
    def healthy(self) -> bool:
        return self.connected and not self.last_error

    def request_present(self, generation: int) -> None:
        """Read the servos' present position (before any further write) for episode ``generation``."""
        with self._lock:
            self._present_wanted = generation
            self._target = None  # a target meant for the previous episode must not go out first
            self._behind = None
        self._wake.set()

    def present_for(self, generation: int) -> np.ndarray | None:
        present = self._present
        return present[1] if present is not None and present[0] == generation else None

    def submit(self, target: np.ndarray, tag: int | None = None) -> None:
        """The newest goal (replaces one not yet written); ``tag`` (the tick) comes back in ``written``."""
        with self._lock:
            self._target = np.array(target, dtype=np.float32)
            self._tag = tag
        self._wake.set()

    def run(self) -> None:
        from common.feetech_bus import ArmBus  # lazy: LeRobot's bus stack is only needed when writing

        bus: Any = None
        while not self.stop_event.is_set():
            if bus is None:
                try:
                    bus = ArmBus(self.arm, name=self.arm_name)
                    bus.connect()
                    self.connected, self.last_error = True, ""
                    self.sent = None  # whatever happened while disconnected: read the servos' goal again
                    log.info("arm %s: bus %s connected", self.arm_name, self.arm.port)
                except Exception as exc:
                    bus = None
                    self.connected = False
                    self._report(f"cannot open bus {self.arm.port}: {exc}")
                    self.stop_event.wait(BUS_RETRY_S)
                    continue
            if self._present_wanted is not None:
                wanted = self._present_wanted
                try:
                    position = bus.read_positions()
                except Exception as exc:
                    self._report(f"read of the present position from {self.arm.port} failed: {exc}; reconnecting")
                    bus = self._lost(bus)
                    continue
                with self._lock:
                    if self._present_wanted == wanted:
                        self._present_wanted = None
                self._present = (wanted, position)
                log.info("arm %s: present position %s (episode anchor)", self.arm_name, np.round(position, 1).tolist())
            # Behind the newest target: write the next step one period after the last write, unless a newer
            # target comes first.
            wait_s = 0.1 if self._behind is None else max(0.0, self._last_write + self.period - time.monotonic())
            woken = self._wake.wait(timeout=wait_s)
            self._wake.clear()
            with self._lock:
                target, self._target = self._target, None
                tag, self._tag = self._tag, None
                if target is None and not woken:
                    target = self._behind  # catching up: the last target again, one more step
            if target is None or self._present_wanted is not None:
                continue
            # Never two goals closer than MIN_GAP of a period, even after this thread came late to the last one.
            early = self._last_start + MIN_GAP * self.period - time.monotonic()
            if early > 0:
                self.stop_event.wait(early)
                with self._lock:
                    if self._target is not None:  # a newer goal came meanwhile: it goes instead
                        target, self._target = self._target, None
                        tag, self._tag = self._tag, None
                if self._present_wanted is not None:
                    continue
            try:
                self._last_start = time.monotonic()
                goal = self._step_limited(bus, target)
                bus.write_goals(goal)
                self.sent = goal
                self._last_write = time.monotonic()
                if tag is not None:
                    self.written.append((tag, self._last_write))
                self.writes += 1
                self.last_error = ""
            except ValueError as exc:
                # A goal the driver cannot encode (outside the calibrated range): the bus itself is fine.
                self._report(f"goal refused by the driver: {exc}")
            except Exception as exc:
                self._report(f"write to {self.arm.port} failed: {exc}; reconnecting")
                bus = self._lost(bus)
        if bus is not None:
            self._close(bus)

    def _step_limited(self, bus: Any, target: np.ndarray) -> np.ndarray:
        """``target`` moved at most ``max_step`` from the goal the servos last received (read back first after
        a connect: switching torque on sets every goal to the present position, so that is done first)."""
        if self.sent is None:
            if not bus.torque_enabled:
                bus.enable_torque()
            self.sent = bus.read_goals().astype(np.float64)
            log.info("arm %s: the servos' goal read back: %s (the step limit starts there)", self.arm_name,
                     np.round(self.sent, 1).tolist())
        sent = self.sent.astype(np.float64)
        wanted = np.asarray(target, dtype=np.float64)
        goal = sent + np.clip(wanted - sent, -self.max_step, self.max_step)
        short = not np.array_equal(goal, wanted)
        with self._lock:
            # A new episode asked for the present position meanwhile: its own targets come next, not this one's.
            self._behind = wanted if short and self._present_wanted is None else None
        if short:
            if not self._catching_up:
                log.warning("arm %s: the servos' goal is %.2f from the commanded target (a write came late); "
                            "catching up at max_step per write", self.arm_name, float(np.max(np.abs(wanted - sent))))
            self.limited_writes += 1
        elif self._catching_up:
            log.info("arm %s: caught up with the commanded target after %d step-limited write(s)", self.arm_name,
                     self.limited_writes)
        self._catching_up = short
        return goal

    def _lost(self, bus: Any) -> Any:
        """A failed bus: closed, to be reconnected (and its goal read back) on the next turn."""
        self.connected = False
        self.sent = None
        self._close(bus)
        return None

    def _report(self, text: str) -> None:
        if text != self.last_error:
            log.error("arm %s: %s", self.arm_name, text)
        self.last_error = text

    def _close(self, bus: Any) -> None:
        try:
            bus.disconnect()
        except Exception as exc:
            log.warning("arm %s: closing the bus: %s", self.arm_name, exc)


class Buses:
    """Every arm's bus writer, as the control loop sees them (none in dry-run: then nothing is written)."""

    def __init__(self, config: DeploymentConfig, stop: threading.Event, dry_run: bool) -> None:
        self.writers = {} if dry_run else {name: BusWriter(name, config, stop) for name in config.arms}

    def __bool__(self) -> bool:
        return bool(self.writers)

    def start(self) -> None:
        for writer in self.writers.values():
            writer.start()

    def join(self, timeout_s: float) -> None:
        for writer in self.writers.values():
            writer.join(timeout=timeout_s)

    def broken(self) -> str:
        """Why a bus cannot take writes ("" when every one can)."""
        return "; ".join(f"{w.arm_name}: {w.last_error or 'connecting'}" for w in self.writers.values()
                         if not w.healthy)

    def request_present(self, generation: int) -> None:
        """Every arm reads its servos' present position for episode ``generation`` (its step limit starts there)."""
        for writer in self.writers.values():
            writer.request_present(generation)

    def position(self, generation: int) -> np.ndarray | None:
        """Every arm's present position as its own bus reports it, read since episode ``generation`` started; None
        until all are in (or in dry-run, where there is no bus)."""
        parts = [w.present_for(generation) for w in self.writers.values()]
        if not parts or any(part is None for part in parts):
            return None
        return np.concatenate(parts).astype(np.float32)  # type: ignore[arg-type]

    def write(self, target: np.ndarray, tag: int | None = None) -> None:
        """``target`` (every arm's joints, config order) to the arms' writers; ``tag`` comes back in ``written``."""
        if not np.all(np.isfinite(target)):
            return
        for index, writer in enumerate(self.writers.values()):
            writer.submit(target[index * JOINTS_PER_ARM:(index + 1) * JOINTS_PER_ARM], tag)

    def written(self) -> list[tuple[str, int, float]]:
        """(arm, tick, when) of every tagged goal written since the last call."""
        done = []
        for name, writer in self.writers.items():
            while writer.written:
                tick, written_t = writer.written.popleft()
                done.append((name, tick, written_t))
        return done

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: {"connected": w.connected, "error": w.last_error, "writes": w.writes}
                for name, w in self.writers.items()}
