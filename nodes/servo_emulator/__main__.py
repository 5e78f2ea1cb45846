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

The room: ``sts3215`` (protocol, registers and the servo model), ``bus`` (packet framing and
instructions), ``pty`` (the pseudo-terminal); this module holds the serving loop and ``main``. It may
import ``common`` and its own room.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common.node import start_node
from nodes.servo_emulator.bus import EmulatedBus, build_arm
from nodes.servo_emulator.pty import PtyLink
from nodes.servo_emulator.sts3215 import TRUNCATED_AFTER_S

log = logging.getLogger(__name__)

def write_stats(path: Path, bus: EmulatedBus, extra: dict[str, Any]) -> None:
    payload = {**bus.stats(), **extra, "time": time.time()}
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload))
    temporary.replace(path)


def flush_goal_writes(path: Path | None, bus: EmulatedBus) -> None:
    """Append the Goal_Position writes recorded since the last flush (``emulator.record_goals``), one JSON line
    each: ``t`` (monotonic), ``id``, ``before`` and ``goal`` (ticks), ``torque`` (on before the write)."""
    if path is None:
        return
    lines = []
    for servo_id, servo in sorted(bus.servos.items()):
        while servo.goal_writes:
            t, before, goal, torque = servo.goal_writes.popleft()
            lines.append(json.dumps({"t": t, "id": servo_id, "before": before, "goal": goal, "torque": torque}))
    if lines:
        with path.open("a") as handle:
            handle.write("\n".join(lines) + "\n")


def serve(link: PtyLink, bus: EmulatedBus, stop: threading.Event, stats_path: Path, *,
          stats_every_s: float = 0.5, goals_path: Path | None = None) -> None:
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
            flush_goal_writes(goals_path, bus)
            write_stats(stats_path, bus, {"port": str(link.port), "pty": link.slave_path})


def main(argv: list[str] | None = None) -> int:
    started = start_node("servo_emulator", "Feetech STS3215 servo emulator for one SO-101 arm (on a pseudo-terminal)",
                         argv, instance_of="arm")
    config, name, program, readiness = started.config, started.name, started.program, started.readiness
    arm = config.arms[name]
    stats_dir = config.resolve(config.run_dir) / "stats"
    stats_dir.mkdir(parents=True, exist_ok=True)
    try:
        link = PtyLink(config.resolve(arm.port))
    except OSError as exc:  # e.g. a real serial device at the configured port: not ours to replace
        started.refuse(f"arm {name}: cannot create the emulated port: {exc}")
    bus = EmulatedBus(build_arm(arm, config.emulator, time.monotonic()), line_baud=link.line_baud)
    try:
        # Real servos answer within microseconds whatever the host is doing; on a busy machine a raised
        # priority keeps the emulator's replies inside the driver's 50 ms packet timeout. It sleeps in
        # select() between packets, so this costs other processes nothing.
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    except OSError:
        log.debug("cannot raise the emulator's priority (needs CAP_SYS_NICE); continuing at normal priority")
    stats_path = stats_dir / f"{program}.json"
    goals_path: Path | None = None
    if config.emulator.record_goals:
        goals_path = stats_dir / f"{program}-goals.jsonl"
        goals_path.unlink(missing_ok=True)
        for servo in bus.servos.values():
            servo.record_goals = True
    log.info("emulating %s (robot_id %s, 6 x STS3215) on %s -> %s", name, arm.robot_id, link.port, link.slave_path)
    write_stats(stats_path, bus, {"port": str(link.port), "pty": link.slave_path})
    readiness.ready(port=str(link.port), pty=link.slave_path, robot_id=arm.robot_id)
    try:
        serve(link, bus, started.stop, stats_path, goals_path=goals_path)
    finally:
        readiness.clear()
        flush_goal_writes(goals_path, bus)
        write_stats(stats_path, bus, {"port": str(link.port), "pty": link.slave_path, "stopped": True})
        link.close()
        log.info("stopped; %s", json.dumps(bus.stats()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
