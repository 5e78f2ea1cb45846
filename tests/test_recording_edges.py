"""No episode lost at the edges, under the real supervisord with the demo's programs.

The auto-started first episode waits for the recorder, so it is recorded from its first tick; an
actuator restarted with ``supervisorctl restart`` ends its episode cleanly and its next episode (index 0
again) is recorded too; ``supervisorctl shutdown`` (what ``make stop`` runs) leaves a finished dataset,
not a work directory. Each finished episode loads with LeRobot's ``LeRobotDataset`` and has exactly the
frames of the ticks the actuator published for it, from its first one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import looping_demo_stack, wait_for

from bench.harness import StreamTap
from common.wire.protocol import KIND_ACTION, KIND_EVENT, Message

pytestmark = pytest.mark.timeout(1500)

EPISODE_0_TICKS = 300  # 10 s at the task's 30 fps
EPISODE_1_TICKS = 150


class EpisodeTap(StreamTap):
    """Every executed tick and episode event the actuator publishes, by episode_id."""

    def __init__(self, endpoint: str) -> None:
        self.ticks: dict[str, list[int]] = {}
        self.events: list[Message] = []
        self.order: list[str] = []
        super().__init__(endpoint)

    def take(self, msg: Message) -> None:
        episode_id = msg.meta.get("episode_id")
        if msg.kind == KIND_ACTION and msg.meta.get("role") == "executed" and episode_id:
            if episode_id not in self.ticks:
                self.ticks[episode_id] = []
                self.order.append(episode_id)
            self.ticks[episode_id].append(int(msg.meta["episode_tick"]))
        elif msg.kind == KIND_EVENT and str(msg.meta.get("event", "")).startswith("episode_"):
            self.events.append(msg)

    def seen(self, index: int) -> int:
        """How many ticks of the ``index``-th episode arrived (0 before it started)."""
        with self.lock:
            return len(self.ticks[self.order[index]]) if len(self.order) > index else 0

    def episode(self, index: int) -> tuple[str, list[int]]:
        with self.lock:
            episode_id = self.order[index]
            return episode_id, list(self.ticks[episode_id])


def _metrics(output_dir: Path) -> dict[str, dict[str, Any]]:
    path = output_dir / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {entry["episode_id"]: entry for entry in lines}


def test_episodes_are_recorded_whole_across_auto_start_actuator_restart_and_make_stop(
        tmp_path: Path, tiny_checkpoint: Any) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    stack = looping_demo_stack(tmp_path, tiny_checkpoint("lift", chunk=48))
    tap = EpisodeTap(stack.config.actuator.events_endpoint)  # listening before anything starts
    output_dir = Path(stack.config.recorder.output_dir)
    stack.start()
    try:
        # Episodes as long as the frames asserted below, counted in ticks: a loaded actuator skips ticks, and a
        # clean-clone run's episode 0 had only 175 after 10 s.
        wait_for(lambda: tap.seen(0) >= EPISODE_0_TICKS, timeout_s=600, interval_s=0.5,
                 message=f"the auto-started episode never ran {EPISODE_0_TICKS} ticks")
        restart = stack.ctl("restart", "robot:actuator")
        assert restart.returncode == 0, restart.stdout + restart.stderr
        wait_for(lambda: tap.seen(1) >= EPISODE_1_TICKS, timeout_s=300, interval_s=0.5,
                 message=f"no episode of {EPISODE_1_TICKS} ticks after the actuator restart")
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
        assert frames >= (EPISODE_0_TICKS if position == 0 else EPISODE_1_TICKS), f"only {frames} frames"
        if stop_reason is not None:
            assert entry["stop_reason"] == stop_reason
            assert frames == len(ticks)  # the whole episode: the actuator stopped it, the recorder kept running
        loaded = LeRobotDataset(f"armpipe/{Path(entry['dataset']).name}", root=entry["dataset"],
                                video_backend="pyav")
        # One LeRobot episode per part: more only where the (loaded) actuator skipped a tick (nodes.recorder.parts).
        assert loaded.num_episodes == entry["parts"] and loaded.num_frames == frames
        assert tuple(loaded[frames - 1]["observation.images.front"].shape) == (3, 480, 640)
    assert shutdown_s < 60, f"make stop took {shutdown_s:.0f} s"
