"""One emulated serial bus shared by a state-reader and a second process writing goals (the actuator's
pattern), both through ``common.feetech_bus.ArmBus``: no transaction may ever be corrupted.

The normal run lasts ``ARMPIPE_BUS_SOAK_S`` seconds (default 8) of concurrent traffic; set
``ARMPIPE_BUS_LONG_SOAK=1`` to also run the 60 s soak. Minutes-long runs: ``python -m bench.bus_rate``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON, REPO_ROOT, NodeProcess, wait_for, write_config

from common.config import load_config
from common.wire.protocol import KIND_STATE, Message
from common.wire.transport import LatestSubscriber, SocketFactory

log = logging.getLogger(__name__)
SOAK_S = float(os.environ.get("ARMPIPE_BUS_SOAK_S", "8"))


def writer_process(path: Path, seconds: float, hz: float = 50.0) -> subprocess.Popen[str]:
    """A separate process sync-writing a moving goal through ArmBus (bench.bus_rate's writer role)."""
    return subprocess.Popen([PYTHON, "-m", "bench.bus_rate", "--role", "writer", "--config", str(path),
                             "--arm", "main", "--seconds", str(seconds), "--hz", str(hz)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def gather_states(subscriber: LatestSubscriber, into: list[Message], proc: subprocess.Popen[str],
                  timeout_s: float, until=lambda: False) -> None:
    """Collect states while ``proc`` runs, up to ``timeout_s`` or until ``until()`` holds."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline and not until():
        into += [m for m in subscriber.poll(0.05) if m.kind == KIND_STATE]
    into += [m for m in subscriber.poll(0.2) if m.kind == KIND_STATE]


def emulator_stats(path: Path) -> dict:
    since = time.time()
    stats_file = Path(load_config(path).run_dir) / "stats" / "servo_emulator-main.json"
    return wait_for(lambda: (s := json.loads(stats_file.read_text())) and s["time"] > since + 0.05 and s, 10.0)


def run_shared_bus(tmp_path: Path, procs: list[NodeProcess], seconds: float) -> None:
    path = write_config(tmp_path, "lift", {"arms": {"main": {"read_hz": 100}},
                                           "emulator": {"speed_deg_s": 360, "lag_s": 0.01}})
    arm = load_config(path).arms["main"]
    for module in ("servo_emulator", "state_reader"):
        node = NodeProcess(module, path, name="main").start()
        procs.append(node)
        node.wait_ready(90)
    subscriber = LatestSubscriber(SocketFactory(), [arm.state_endpoint], hwm=100000)
    states: list[Message] = []
    try:
        # An actuator that dies mid-run (SIGKILL, possibly while holding the bus lock) ...
        killed = writer_process(path, 600)
        rest = np.array(arm.rest_pose)
        moving = lambda: bool(states) and np.abs(states[-1].arrays["position"] - rest).max() > 2.0  # noqa: E731
        gather_states(subscriber, states, killed, timeout_s=90.0, until=moving)  # imports LeRobot, connects
        assert moving(), f"the first writer never moved the arm: {killed.poll()} {killed.stderr.read()[-3000:]}"
        gather_states(subscriber, states, killed, timeout_s=1.0)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=10)
        # ... and its restart, which shares the bus for the whole soak.
        writer = writer_process(path, seconds)
        gather_states(subscriber, states, writer, timeout_s=seconds + 120)
        out, err = writer.communicate(timeout=30)
        assert writer.returncode == 0, err[-3000:]
    finally:
        subscriber.close()
    written = json.loads(out.strip().splitlines()[-1])
    assert written["writes"] > 0 and written["raised"] == 0, written
    assert written["corrupt"] == 0, written

    assert len(states) > 100
    reader_bus = states[-1].meta["bus"]
    assert reader_bus["corrupt"] == 0, reader_bus
    positions = np.stack([s.arrays["position"] for s in states])
    assert np.all(np.isfinite(positions))
    # No garbage ever came through: every reading lies in the arm's range (plus the driver's rounding).
    assert np.all(positions >= np.array(arm.lower_limits) - 1.0) and np.all(positions <= np.array(arm.upper_limits)
                                                                              + 1.0)
    # The writer really drove the arm while the reader read it: the readings follow the commanded swing.
    commanded_span = np.array(written["commanded_max"]) - np.array(written["commanded_min"])
    observed_span = positions.max(axis=0) - positions.min(axis=0)
    assert np.all(observed_span >= 0.5 * commanded_span), (observed_span, commanded_span)

    stats = emulator_stats(path)
    assert stats["corrupt_packets"] == 0 and stats["discarded_bytes"] == 0 and stats["bad_params"] == 0, stats
    assert stats["instructions"]["sync_write"] >= written["writes"]
    log.info("shared bus %.0f s: %d states, reader bus %s; writer %s; emulator packets %d, corrupt %d", seconds,
             len(states), reader_bus, {k: written[k] for k in ("writes", "corrupt", "timeouts", "raised")},
             stats["packets"], stats["corrupt_packets"])


def test_state_reader_and_writer_share_one_bus_without_corruption(tmp_path: Path,
                                                                    node_processes: list[NodeProcess]) -> None:
    run_shared_bus(tmp_path, node_processes, SOAK_S)


@pytest.mark.skipif(os.environ.get("ARMPIPE_BUS_LONG_SOAK") != "1", reason="60 s soak: set ARMPIPE_BUS_LONG_SOAK=1")
def test_shared_bus_long_soak(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    run_shared_bus(tmp_path, node_processes, 60.0)


def test_arm_bus_interface(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    """What the actuator relies on: idempotent connect, validated goals, torque handling, LeRobot's motor table."""
    from lerobot.robots.so_follower import SO101Follower, SO101FollowerConfig

    from common.feetech_bus import ArmBus, so101_motors

    path = write_config(tmp_path, "lift", {"emulator": {"speed_deg_s": 720, "lag_s": 0.0}})
    arm = load_config(path).arms["main"]
    emulator = NodeProcess("servo_emulator", path, name="main").start()
    node_processes.append(emulator)
    emulator.wait_ready(30)
    # The same motor table and norm modes as LeRobot's own SO-101 follower.
    follower = SO101Follower(SO101FollowerConfig(port=arm.port, id="so101_main", calibration_dir=tmp_path / "cal"))
    assert so101_motors() == follower.bus.motors

    first = ArmBus(arm, name="main")
    first.connect()
    first.connect()  # idempotent
    assert first.joint_names == arm.joint_names() and not first.torque_enabled
    rest = first.read_positions()
    assert rest.dtype == np.float32 and rest.shape == (6,)
    for bad, field in ((np.full(6, np.nan, np.float32), "NaN"), (np.zeros(5, np.float32), "shape")):
        with pytest.raises(ValueError, match="goals") as raised:
            first.write_goals(bad)
        assert field in str(raised.value)
    assert not first.torque_enabled  # refused goals never reached the bus
    goal = rest + np.array([10, -10, 10, -10, 20, 15], np.float32)
    first.write_goals(goal)  # switches torque on at the present pose, then moves
    assert first.torque_enabled
    wait_for(lambda: np.abs(first.read_positions() - goal).max() < 0.5, 10.0)
    first.disconnect()  # leaves torque on: the arm keeps holding

    second = ArmBus(arm, name="main")
    second.connect()  # nothing to configure, torque already on
    assert second.torque_enabled
    np.testing.assert_allclose(second.read_positions(), goal, atol=0.5)
    second.disable_torque()
    second.disconnect()
    stats = emulator_stats(path)
    assert [servo["torque"] for servo in stats["servos"].values()] == [0] * 6
    assert stats["corrupt_packets"] == 0
