"""No episode lost at the edges, under the real supervisord with the demo's programs.

The auto-started first episode waits for the recorder, so it is recorded from its first tick; an
actuator restarted with ``supervisorctl restart`` ends its episode cleanly and its next episode (index 0
again) is recorded too; ``supervisorctl shutdown`` (what ``make stop`` runs) leaves a finished dataset,
not a work directory. Each finished episode loads with LeRobot's ``LeRobotDataset`` and has exactly the
frames of the ticks the actuator published for it, from its first one.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import REPO_ROOT, free_port, wait_for, write_config

from bench.harness import Supervised
from common.config import load_config
from common.tools.demo_data import DemoSpec, generate_demo_dataset
from common.wire.protocol import KIND_ACTION, KIND_EVENT, Message
from common.wire.transport import LatestSubscriber, SocketFactory

pytestmark = pytest.mark.timeout(1500)


class EpisodeTap:
    """Every executed tick and episode event the actuator publishes, by episode_id."""

    def __init__(self, endpoint: str) -> None:
        self.ticks: dict[str, list[int]] = {}
        self.first_t: dict[str, float] = {}
        self.events: list[Message] = []
        self.order: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(endpoint,), daemon=True)
        self._thread.start()

    def _run(self, endpoint: str) -> None:
        factory = SocketFactory(zmq.Context())
        subscriber = LatestSubscriber(factory, [endpoint], hwm=100000)
        try:
            while not self._stop.is_set():
                for msg in subscriber.poll(0.1):
                    with self._lock:
                        episode_id = msg.meta.get("episode_id")
                        if msg.kind == KIND_ACTION and msg.meta.get("role") == "executed" and episode_id:
                            if episode_id not in self.ticks:
                                self.ticks[episode_id] = []
                                self.order.append(episode_id)
                                self.first_t[episode_id] = time.monotonic()
                            self.ticks[episode_id].append(int(msg.meta["episode_tick"]))
                        elif msg.kind == KIND_EVENT and str(msg.meta.get("event", "")).startswith("episode_"):
                            self.events.append(msg)
        finally:
            subscriber.close()
            factory.context.term()

    def running_for(self, index: int) -> float:
        with self._lock:
            if len(self.order) <= index:
                return 0.0
            return time.monotonic() - self.first_t[self.order[index]]

    def episode(self, index: int) -> tuple[str, list[int]]:
        with self._lock:
            episode_id = self.order[index]
            return episode_id, list(self.ticks[episode_id])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def _metrics(output_dir: Path) -> dict[str, dict[str, Any]]:
    path = output_dir / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {entry["episode_id"]: entry for entry in lines}


def test_episodes_are_recorded_whole_across_auto_start_actuator_restart_and_make_stop(
        tmp_path: Path, tiny_checkpoint: Any) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    config = load_config(REPO_ROOT / "configs" / "lift.yaml")
    dataset = generate_demo_dataset(config, tmp_path / "lift-demo", DemoSpec(episodes=1, frames=300),
                                    repo_id="armpipe/lift-demo")
    port = free_port()
    config_path = write_config(tmp_path, "lift", {
        "player": {"dataset": str(dataset), "loop": True},
        "policy": {"checkpoint": str(tiny_checkpoint("lift", chunk=48)), "timeout_s": 5.0},
        "monitor": {"supervisor_url": f"http://127.0.0.1:{port}/RPC2"},
    })
    stack = Supervised("demo", "lift", config_path, tmp_path / "run", port)
    tap = EpisodeTap(stack.config.actuator.events_endpoint)  # listening before anything starts
    output_dir = Path(stack.config.recorder.output_dir)
    stack.start()
    try:
        wait_for(lambda: tap.running_for(0) >= 10.0, timeout_s=600, interval_s=0.5,
                 message="the auto-started episode never ran for 10 s")
        restart = stack.ctl("restart", "robot:actuator")
        assert restart.returncode == 0, restart.stdout + restart.stderr
        wait_for(lambda: tap.running_for(1) >= 5.0, timeout_s=300, interval_s=0.5,
                 message="no episode after the actuator restart")
    finally:
        stopped_at = time.monotonic()
        stack.shutdown(timeout_s=90)  # `make stop`: supervisorctl shutdown, then wait for supervisord to exit
        tap.close()
    shutdown_s = time.monotonic() - stopped_at
    recorder_log = (tmp_path / "run" / "logs" / "recorder.log").read_text(errors="replace")
    assert "SIGKILL" not in (tmp_path / "run" / "logs" / "supervisord.log").read_text(), "a program was killed"
    assert not any((output_dir / ".work").glob("episode_*")), f"left for recovery:\n{recorder_log[-3000:]}"

    metrics = _metrics(output_dir)
    indices = [event.meta["episode_index"] for event in tap.events if event.meta["event"] == "episode_start"]
    assert indices[:2] == [0, 0], "the restarted actuator's first episode has index 0 again"
    for position, stop_reason in ((0, "actuator_stopped"), (1, None)):
        episode_id, ticks = tap.episode(position)
        entry = metrics.get(episode_id)
        assert entry is not None, f"episode {position} ({episode_id}) not recorded:\n{recorder_log[-3000:]}"
        frames = entry["frames"]
        # From its first tick, without a gap, nothing dropped; every frame is a tick the actuator published.
        assert entry["episode_ticks"] == {"first": 0, "last": frames - 1, "recorded": frames}, \
            f"{entry}\n{recorder_log[-3000:]}"
        assert entry["dropped_ticks"] == 0 and not entry["implicit_start"] and not entry["rejected_ticks"], entry
        assert ticks[:frames] == list(range(frames))
        assert frames >= (300 if position == 0 else 150), f"only {frames} frames"
        if stop_reason is not None:
            assert entry["stop_reason"] == stop_reason
            assert frames == len(ticks)  # the whole episode: the actuator stopped it, the recorder kept running
        loaded = LeRobotDataset(f"armpipe/{Path(entry['dataset']).name}", root=entry["dataset"],
                                video_backend="pyav")
        # One LeRobot episode per part: more only where the (loaded) actuator skipped a tick (nodes.recorder.parts).
        assert loaded.num_episodes == entry["parts"] and loaded.num_frames == frames
        assert tuple(loaded[frames - 1]["observation.images.front"].shape) == (3, 480, 640)
    assert shutdown_s < 60, f"make stop took {shutdown_s:.0f} s"
