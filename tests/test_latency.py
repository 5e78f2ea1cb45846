"""The latency chain (docs/protocol.md, section 8): stamps in order, no negative stage, the end is the bus write.

The pipeline test runs the real robot side as processes (servo emulator, state-reader, two synthetic
cameras, the policy node with a tiny DiffusionPolicy, the actuator writing to the emulated bus) and
reads the actuator's ``latency`` events; then it kills the servo emulator: goals keep being commanded
(holds with ``bus_error``) but no latency event comes for a goal that never reached the bus.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import NodeProcess, free_port, wait_for, write_config
from test_actuator import EventTap, slow_checkpoint, slow_config, start_actuator, start_policy  # noqa: F401

from common.config import load_config
from common.wire.latency import STAGE_NAMES, STAMPS, LatencyError, stages
from common.wire.protocol import KIND_EVENT, Message
from common.wire.transport import Publisher, SocketFactory
from nodes.actuator.latency import LatencyTracker

SERVER = {"unpack_s": 0.001, "decode_s": 0.002, "preprocess_s": 0.0005, "inference_s": 0.010,
          "postprocess_s": 0.0005, "total_s": 0.013, "server_s": 0.0145}


def test_stages_tile_capture_to_written_and_name_a_bad_field() -> None:
    stamps = dict(zip(STAMPS, [10.0, 10.002, 10.003, 10.020, 10.040, 10.050, 10.060, 10.061], strict=True))
    durations = stages(stamps, SERVER)
    assert list(durations) == list(STAGE_NAMES)
    assert sum(durations.values()) == pytest.approx(stamps["written_t"] - stamps["capture_t"]) == pytest.approx(0.061)
    assert durations["network"] == pytest.approx(0.020 - 0.0145)
    assert durations["inference"] == pytest.approx(0.011)
    assert durations["server_reply"] == pytest.approx(0.0145 - 0.001 - 0.013)
    assert durations["server_queue"] == 0.0  # a server from before batching sends no queue_s
    # A request that waited 4 ms for another batch: the wait is its own stage and the stages still tile.
    queued = stages(stamps, {**SERVER, "queue_s": 0.004, "total_s": 0.017, "server_s": 0.0185})
    assert queued["server_queue"] == pytest.approx(0.004)
    assert queued["server_reply"] == pytest.approx(0.0185 - 0.001 - 0.017)
    assert sum(queued.values()) == pytest.approx(0.061)
    with pytest.raises(LatencyError, match=r"stamps\.written_t"):
        stages({**stamps, "written_t": float("nan")}, SERVER)
    with pytest.raises(LatencyError, match=r"server\.server_s"):
        stages(stamps, {k: v for k, v in SERVER.items() if k != "server_s"})


def test_tracker_waits_for_every_arm_and_marks_the_first_row_of_a_chunk() -> None:
    tracker = LatencyTracker(fps=30, arms=["left", "right"])
    observed = {"capture_t": 1.0, "published_t": 1.001, "received_t": 1.002}
    tracker.chunk_queued(1.0, observed, sent_t=1.01, replied_t=1.03, scheduled_t=1.034, server=SERVER)
    assert tracker.executed(7, obs_t=1.0, row_t=1.0 + 2 / 30, executed_t=1.067, episode_index=0)
    assert not tracker.executed(8, obs_t=5.0, row_t=5.0, executed_t=1.1, episode_index=0)  # unknown chunk
    assert tracker.written(7, "left", 1.068) is None  # the right arm's write is still out
    event = tracker.written(7, "right", 1.069)
    assert event is not None and event["tick"] == 7 and event["row"] == 2 and event["first_row"] is True
    assert event["stamps"]["written_t"] == 1.069 and event["end_to_end_s"] == pytest.approx(0.069)
    assert tracker.executed(9, obs_t=1.0, row_t=1.0 + 3 / 30, executed_t=1.1, episode_index=0)
    assert tracker.written(9, "left", 1.101) is None
    assert tracker.written(9, "right", 1.102)["first_row"] is False
    assert tracker.written(12345, "left", 2.0) is None  # a tick that executed nothing


def emulator_sync_writes(config_path: Path) -> int:
    stats = json.loads((Path(load_config(config_path).run_dir) / "stats" / "servo_emulator-main.json").read_text())
    return int(stats["instructions"].get("sync_write", 0))


def test_pipeline_stamps_are_ordered_and_end_at_the_bus_write(
        tmp_path: Path, node_processes: list[NodeProcess], slow_checkpoint: Path) -> None:  # noqa: F811
    config_path = slow_config(tmp_path, slow_checkpoint, {"auto_start": True, "refill_rows": 100})
    config = load_config(config_path)
    emulator = None
    for module, name in (("servo_emulator", "main"), ("state_reader", "main"), ("camera", "front"),
                         ("camera", "wrist")):
        node = NodeProcess(module, config_path, name=name).start()
        node_processes.append(node)
        node.wait_ready(120)
        emulator = emulator or node
    start_policy(node_processes, config_path)
    tap = EventTap(config)
    try:
        start_actuator(node_processes, config_path).wait_ready(60)
        wait_for(lambda: len(tap.events("latency")) >= 4, 180, interval_s=0.2,
                 message="no latency events from the actuator writing to the emulated bus")
        events = tap.events("latency")
        executed = {m.meta["tick"]: m for m in tap.actions() if not m.meta["hold"]}
        for event in events:
            meta = event.meta
            times = [meta["stamps"][key] for key in STAMPS]
            assert times == sorted(times), meta["stamps"]
            assert all(value >= 0 for value in meta["stages"].values()), meta["stages"]
            assert list(meta["stages"]) == list(STAGE_NAMES)
            assert sum(meta["stages"].values()) == pytest.approx(meta["end_to_end_s"], abs=1e-9)
            # The chain belongs to a goal the actuator commanded at that tick, from that observation ...
            action = executed[meta["tick"]]
            assert action.meta["obs_t"] == meta["obs_t"] == meta["stamps"]["capture_t"]
            assert meta["stamps"]["executed_t"] == pytest.approx(action.t, abs=0.05)
            # ... and ends when the write returned, after the tick that commanded it.
            assert meta["stamps"]["written_t"] > meta["stamps"]["executed_t"]
            assert set(meta["server"]) >= {"unpack_s", "inference_s", "server_s"}
        assert any(e.meta["first_row"] for e in events)
        assert emulator_sync_writes(config_path) >= len(events)

        # No bus, no end: with the emulator gone, goals are still commanded but none is written.
        assert emulator is not None
        emulator.kill(signal.SIGKILL)
        killed = time.monotonic()
        tap.wait_action(lambda m: m.meta["hold_reason"] == "bus_error", 30, since=killed,
                        message="the actuator never noticed the bus was gone")
        time.sleep(2.0)
        late = [e for e in tap.events("latency") if e.meta["stamps"]["executed_t"] > killed + 0.5]
        assert late == []
        assert np.isfinite([e.meta["end_to_end_s"] for e in events]).all()
    finally:
        tap.close()


def test_the_monitor_keeps_latency_events_for_the_panel(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    config_path = write_config(tmp_path, "lift", {"monitor": {"supervisor_url": f"http://127.0.0.1:{free_port()}/RPC2"}})
    config = load_config(config_path)
    monitor = NodeProcess("monitor", config_path)
    node_processes.append(monitor)
    monitor.start().wait_ready(60)
    events = Publisher(SocketFactory(), config.actuator.events_endpoint, "actuator")
    tracker = LatencyTracker(fps=30, arms=["main"])
    tracker.chunk_queued(1.0, {"capture_t": 1.0, "published_t": 1.001, "received_t": 1.002}, sent_t=1.01,
                         replied_t=1.03, scheduled_t=1.034, server=SERVER)
    tracker.executed(3, obs_t=1.0, row_t=1.0 + 1 / 30, executed_t=1.04, episode_index=0)
    meta = tracker.written(3, "main", 1.0415)
    assert meta is not None

    def shown() -> list | None:
        events.publish(Message(kind=KIND_EVENT, meta=meta))
        url = f"http://127.0.0.1:{config.monitor.port}/api/state"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read()).get("latency") or None

    try:
        latency = wait_for(shown, timeout_s=20, interval_s=0.2, message="the monitor never kept a latency event")
    finally:
        events.close()
    assert latency[-1]["tick"] == 3 and latency[-1]["end_to_end_s"] == pytest.approx(0.0415)
    assert list(latency[-1]["stages"]) == list(STAGE_NAMES)
