"""A recorder restarted during an episode resumes the same recording (issue 25, item 3), under the real
supervisord with the demo's programs (dataset player, emulated servos, tiny policy, actuator, recorder).

The recorder is killed (``kill -9``) and later restarted (``supervisorctl restart``) while the auto-started
episode runs. Afterwards there is one recording of that episode, not two: its downtimes are gaps in true
time (the recording is cut into parts there; each part's timestamps plus its ``start_s`` are the
actuator's scheduled tick times), the ticks of the downtimes are filled in from the actuator's backlog
(``gap_ticks.parquet``: the very targets the actuator published), and the recorder records again after each.
How soon (within 2 s) is a speed number: ``bench/recorder_restart.py`` measures it, docs/benchmarks.md has it.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import looping_demo_stack, wait_for

from bench.harness import StreamTap
from common.wire.actuator_client import ActuatorClient
from common.wire.protocol import KIND_ACTION, Message
from common.wire.transport import SocketFactory
from nodes.recorder.parts import MAX_DRIFT_PERIODS

pytestmark = pytest.mark.timeout(1200)
# A recorder that never came back, not a speed target (bench/recorder_restart.py measures that).
BACK_AT_ALL_S = 15.0


class TickTap(StreamTap):
    """Every executed tick of every episode as the actuator published it: time, lateness and target."""

    def __init__(self, endpoint: str) -> None:
        self.ticks: dict[str, dict[int, tuple[float, float, np.ndarray]]] = {}
        self.order: list[str] = []
        super().__init__(endpoint)

    def take(self, msg: Message) -> None:
        episode_id = msg.meta.get("episode_id")
        if msg.kind != KIND_ACTION or msg.meta.get("role") != "executed" or not episode_id:
            return
        if episode_id not in self.ticks:
            self.ticks[episode_id] = {}
            self.order.append(episode_id)
        self.ticks[episode_id][int(msg.meta["episode_tick"])] = (
            msg.t, float(msg.meta.get("lateness_s") or 0.0), np.array(msg.arrays["action"], dtype=np.float32))

    def count(self, index: int = 0) -> int:
        with self.lock:
            return len(self.ticks[self.order[index]]) if len(self.order) > index else 0

    def episode(self, index: int = 0) -> tuple[str, dict[int, tuple[float, float, np.ndarray]]]:
        with self.lock:
            return self.order[index], dict(self.ticks[self.order[index]])


def journaled(work: Path) -> int:
    journal = work / "journal.jsonl"
    return journal.read_text().count('"type":"tick"') if journal.exists() else 0


def test_a_restarted_recorder_resumes_the_same_recording_in_true_time(tmp_path: Path, tiny_checkpoint: Any) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    stack = looping_demo_stack(tmp_path, tiny_checkpoint("lift", chunk=48))
    tap = TickTap(stack.config.actuator.events_endpoint)
    output_dir = Path(stack.config.recorder.output_dir)
    work = output_dir / ".work" / "episode_000000"
    recorder_log = tmp_path / "run" / "logs" / "recorder.log"
    stack.start()
    try:
        wait_for(lambda: journaled(work) >= 90, timeout_s=600, interval_s=0.5,
                 message="the auto-started episode was never recorded for 3 s")
        # kill -9: supervisord starts it again; it resumes the recording.
        first = stack.running_pid("recorder")
        restarts = [time.monotonic()]  # the robot's monotonic clock: the actuator's stamps are on it too
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: stack.running_pid("recorder") not in (0, first), timeout_s=30,
                 message="recorder not respawned")
        seen = tap.count()
        wait_for(lambda: tap.count() >= seen + 150, timeout_s=300, interval_s=0.5, message="the episode stalled")
        # supervisorctl restart: SIGTERM while supervisord runs on, so the recording is suspended, not ended.
        restarts.append(time.monotonic())
        restart = stack.ctl("restart", "robot:recorder")
        assert restart.returncode == 0, restart.stdout + restart.stderr
        seen = tap.count()
        wait_for(lambda: tap.count() >= seen + 150, timeout_s=300, interval_s=0.5, message="the episode stalled")
        control = ActuatorClient(SocketFactory(), stack.config.actuator.control_endpoint, client="test")
        try:
            control.send("stop", label="success")
        finally:
            control.close()
        wait_for(lambda: (output_dir / "metrics.jsonl").exists(), timeout_s=180, interval_s=0.5,
                 message=f"the episode was never saved:\n{recorder_log.read_text(errors='replace')[-4000:]}")
    finally:
        stack.shutdown(timeout_s=90)
        tap.close()
    log_text = recorder_log.read_text(errors="replace")
    episode_id, ticks = tap.episode(0)
    entries = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [entry["episode_id"] for entry in entries].count(episode_id) == 1, (entries, log_text[-4000:])
    assert len({entry["episode"] for entry in entries}) == 1, "the episode was split into two recordings"
    metrics = entries[-1]
    assert metrics["label"] == "success" and metrics["resumed"] == 2, (metrics, log_text[-4000:])
    # Both downtimes are counted, the one a kill -9 cut short as well as the one a restart ended.
    saved_parts = json.loads((Path(metrics["dataset"]) / "meta" / "info.json").read_text())["armpipe_parts"]
    recorded_ticks = pd.read_parquet(Path(metrics["dataset"]) / "armpipe" / "ticks.parquet")["episode_tick"]
    # The restarts' gaps: where a new video segment begins (other gaps may come from a loaded machine), in the
    # actuator's episode_tick numbers: the ticks it ran meanwhile. A part's gap_ticks is the gap in true time,
    # one more where the actuator itself skipped a slot in the downtime (it fell behind): no tick to fill there.
    restarts_at = [part for previous, part in itertools.pairwise(saved_parts) if part["segment"] != previous["segment"]]
    restart_ticks = [part["first_episode_tick"] - int(recorded_ticks.iloc[part["from_frame"] - 1]) - 1
                     for part in restarts_at]
    assert len(restart_ticks) == 2, saved_parts
    assert all(part["gap_ticks"] >= ticks > 0 for part, ticks in zip(restarts_at, restart_ticks, strict=True))
    assert metrics["dropped_ticks_by_reason"].get("recorder_restarted") == sum(restart_ticks), metrics
    assert metrics["gap_ticks_filled"] == sum(restart_ticks), metrics

    root = Path(metrics["dataset"])
    info = json.loads((root / "meta" / "info.json").read_text())
    parts = info["armpipe_parts"]
    assert len(parts) >= 3 and metrics["parts"] == len(parts), parts
    frames = pd.read_parquet(root / "armpipe" / "ticks.parquet")
    gap = pd.read_parquet(root / "armpipe" / "gap_ticks.parquet")
    recorded, filled = set(frames["episode_tick"]), set(gap["episode_tick"])
    assert not recorded & filled
    # The downtime's ticks come from the actuator's backlog: exactly what it published for them.
    for row in gap.itertuples():
        np.testing.assert_allclose(np.asarray(row.action, dtype=np.float32), ticks[row.episode_tick][2], atol=1e-5)
    # Every tick of the episode is a frame or filled in, but those lost for another reason (counted as such).
    last = max(recorded)
    other = sum(count for reason, count in metrics["dropped_ticks_by_reason"].items() if reason != "recorder_restarted")
    missing = set(range(last + 1)) - recorded - filled
    assert len(missing) <= other, (sorted(missing)[:20], metrics["dropped_ticks_by_reason"])

    # True time: each frame's timestamp plus its part's start is its tick's scheduled time on the actuator.
    loaded = LeRobotDataset(f"armpipe/{root.name}", root=root, video_backend="pyav")
    assert loaded.num_episodes == len(parts) and loaded.num_frames == len(frames)
    scheduled = {tick: t - lateness for tick, (t, lateness, _) in ticks.items()}
    origin = scheduled[int(frames["episode_tick"].iloc[0])]
    timestamps = np.asarray(loaded.hf_dataset["timestamp"], dtype=np.float64)
    part_of = np.asarray(loaded.hf_dataset["episode_index"])
    for index, episode_tick in enumerate(frames["episode_tick"]):
        true_s = scheduled[int(episode_tick)] - origin
        # Within half a period: the actuator's phase follows the data, and a part is cut past that drift.
        assert abs(parts[int(part_of[index])]["start_s"] + timestamps[index] - true_s) <= (
            MAX_DRIFT_PERIODS / stack.config.fps + 1e-3), (index, episode_tick)
    # Back after each: from the kill (or the restart command) to the first frame recorded after it. (The frames
    # still in the killed encoders are lost: their ticks are among those filled in from the backlog.)
    frame_times = sorted(scheduled[int(tick)] for tick in frames["episode_tick"])
    back = [next(t for t in frame_times if t > when) - when for when in restarts]
    assert max(back) <= BACK_AT_ALL_S, (back, parts)
    last_frame = loaded[loaded.num_frames - 1]["observation.images.front"]
    assert tuple(last_frame.shape) == (3, 480, 640)


def test_the_backlog_pages_fit_the_protocol_and_give_everything_once() -> None:
    """Pages of the actuator's backlog always encode (the header limit: an oversized control reply once took
    the actuator down), and paging from next_after_tick / next_after_t returns every tick and event once."""
    from common.wire.protocol import KIND_EVENT, KIND_REPLY, decode, encode
    from nodes.actuator.backlog import Backlog

    backlog = Backlog(30.0, lambda: np.arange(6, dtype=np.float32), lambda: "episode-a")
    names = [f"j{i}" for i in range(6)]
    for k in range(900):
        t = 100.0 + k / 30
        backlog.remember(Message(kind=KIND_ACTION, t=t, meta={
            "role": "executed", "names": names, "tick": k, "hold": False, "hold_reason": "", "episode_index": 0,
            "episode_id": "episode-a", "episode_tick": k, "obs_t": t - 0.1, "frame_index": k, "queue_depth": 5,
            "lateness_s": 0.001}, arrays={"action": np.full(6, float(k), np.float32)}))
        # Large events (a latency event's stages and the policy's timings), one per tick.
        backlog.remember(Message(kind=KIND_EVENT, t=t + 0.001, meta={
            "event": "latency", "tick": k, "end_to_end_s": 0.1, "stages": {f"stage_{i}": 0.01 for i in range(20)},
            "stamps": {f"stamp_{i}": t for i in range(20)}}))
    assert backlog.serve({"max_ticks": 0}) == {**backlog.serve({"max_ticks": 0}), "ticks": [], "events": []}
    ticks: list[int] = []
    events = 0
    after_tick, after_t, pages = -1, -1e300, 0
    while True:
        meta = backlog.serve({"episode_id": "episode-a", "after_tick": after_tick, "after_t": after_t})
        decode(encode(Message(kind=KIND_REPLY, meta={"op": "backlog", **meta})))  # fits, and reads back
        ticks += [row["episode_tick"] for row in meta["ticks"]]
        events += len(meta["events"])
        pages += 1
        if not meta["more"]:
            break
        after_tick, after_t = meta["next_after_tick"], meta["next_after_t"]
    assert ticks == list(range(900)) and events == 900 and pages > 4
