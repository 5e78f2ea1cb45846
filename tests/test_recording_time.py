"""A recording never compresses time (issue 25, item 3).

The recorder's own receiver (``TickAssembler``), writer and finisher threads run here as in the node,
with real camera encoders and LeRobot v3 files; the writer is forced to stall for two seconds in the
middle of an episode, so more ticks arrive than ``recorder.queue_ticks`` can hold. The saved recording
must then be cut into parts at the gap, each a LeRobot episode whose timestamps, plus the part's
``start_s``, are the actuator's scheduled tick times; the summary says the episode was split. The
actuator's own skipped tick (too late for it) cuts a part too.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from conftest import wait_for
from test_recorder import image_for, load_dataset, small_config

from common.config import load_config
from common.wire.protocol import KIND_ACTION, KIND_EVENT, KIND_FRAME, KIND_STATE, Message
from nodes.recorder.__main__ import Finisher, Writer
from nodes.recorder.assembler import TickAssembler
from nodes.recorder.writer import EpisodeWriter


class InProcessRecorder:
    """The recorder's threads without its sockets: the test hands it messages as its receiver would."""

    def __init__(self, config: Any, output_dir: Path) -> None:
        self.config = config
        self.work: queue.Queue[Any] = queue.Queue()
        self.finisher = Finisher(config, output_dir)
        self.assembler = TickAssembler(config, output_dir, self.work)
        self.writer = Writer(config, output_dir, self.work, self.assembler, self.finisher)
        self.finisher.start()
        self.writer.start()
        self.seq: dict[str, int] = {}

    def send(self, kind: str, t: float, meta: dict[str, Any], arrays: dict[str, np.ndarray] | None = None,
             src: str = "actuator") -> Message:
        self.seq[src] = self.seq.get(src, 0) + 1
        msg = Message(kind=kind, src=src, seq=self.seq[src], t=t, meta=meta, arrays=arrays or {})
        self.assembler.on_message(msg, time.monotonic())
        return msg

    def close(self) -> None:
        self.assembler.shutdown()
        self.work.put(None)
        self.writer.join(timeout=60)
        self.finisher.jobs.put(None)
        self.finisher.join(timeout=60)


def test_a_stalled_writer_cuts_the_recording_into_parts_that_keep_true_time(tmp_path: Path, monkeypatch: Any) -> None:
    config = load_config(small_config(tmp_path, queue_ticks=20))
    output_dir = tmp_path / "recordings"
    output_dir.mkdir()
    names = config.action_names()
    period = 1.0 / config.fps

    running = threading.Event()
    running.set()
    add_tick = EpisodeWriter.add_tick

    def stalling_add_tick(self: EpisodeWriter, tick: Any) -> None:
        running.wait()  # the forced stall: the writer takes nothing while it is cleared
        add_tick(self, tick)

    monkeypatch.setattr(EpisodeWriter, "add_tick", stalling_add_tick)
    recorder = InProcessRecorder(config, output_dir)
    episode_id = "7f0c1e2d-episode"
    t0 = time.monotonic()
    slot_of: dict[int, int] = {}  # episode_tick -> the actuator's tick slot (scheduled at t0 + slot / fps)
    try:
        recorder.send(KIND_EVENT, t0, {"event": "episode_start", "episode_index": 0, "episode_id": episode_id,
                                       "label": "", "reason": "start"})
        skipped = 0
        for k in range(150):
            if k == 40:
                running.clear()  # the writer stalls: ticks pile up past queue_ticks and are dropped
            if k == 100:
                running.set()
            if k == 130:
                skipped += 1  # the actuator itself was too late for one tick and skipped it (missed_ticks)
            slot = slot_of[k] = k + skipped
            scheduled = t0 + slot * period
            lateness = 0.003 * (k % 4)
            inputs = {}
            for index, camera in enumerate(config.cameras):
                msg = recorder.send(KIND_FRAME, scheduled - 0.01, {"camera": camera, "source": "camera"},
                                    {"image": image_for(index, k)}, src=f"camera-{camera}")
                inputs[camera] = msg.seq
            state = np.arange(len(names), dtype=np.float32) + k
            for arm_index, (arm, arm_config) in enumerate(config.arms.items()):
                msg = recorder.send(KIND_STATE, scheduled - 0.01, {"arm": arm, "names": arm_config.joint_names(),
                                                                   "source": "robot"},
                                    {"position": state[arm_index * 6:(arm_index + 1) * 6].copy()},
                                    src=f"state_reader-{arm}")
                inputs[arm] = msg.seq
            recorder.send(KIND_ACTION, scheduled + lateness, {
                "role": "executed", "names": names, "tick": 1000 + k, "hold": False, "hold_reason": "",
                "episode_index": 0, "episode_id": episode_id, "episode_tick": k, "obs_t": scheduled - 0.01,
                "inputs": inputs, "frame_index": -1, "queue_depth": 4, "lateness_s": lateness},
                {"action": state + 1})
            time.sleep(0.02)
        recorder.send(KIND_EVENT, t0 + 152 * period, {
            "event": "episode_stop", "episode_index": 0, "episode_id": episode_id, "label": "success",
            "reason": "stop"})
        wait_for(lambda: (output_dir / "summary.json").exists(), timeout_s=120, message="the episode was never saved")
    finally:
        running.set()
        recorder.close()

    root = output_dir / "episode_000000"
    metrics = json.loads((root / "armpipe" / "episode.json").read_text())
    assert metrics["dropped_ticks_by_reason"].get("writer_behind", 0) > 0, metrics["dropped_ticks_by_reason"]
    info = json.loads((root / "meta" / "info.json").read_text())
    parts = info["armpipe_parts"]
    # One cut where the stalled writer dropped ticks, one where the actuator skipped a tick.
    assert len(parts) == 3, parts
    assert metrics["parts"] == 3 and len(metrics["gaps"]) == 2
    assert metrics["gaps"][1]["ticks"] == 1 and abs(metrics["gaps"][1]["seconds"] - period) < 1e-6
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["split_episodes"]["episode_000000"]["parts"] == 3

    # Every saved frame's timestamp, plus its part's start, is its tick's scheduled time on the actuator.
    ticks = pd.read_parquet(root / "armpipe" / "ticks.parquet")
    dataset = load_dataset(root)
    assert dataset.num_episodes == 3 and dataset.num_frames == len(ticks) < 150
    first_slot = slot_of[int(ticks["episode_tick"].iloc[0])]
    for index in range(dataset.num_frames):
        row = dataset.hf_dataset[index]
        part = parts[int(row["episode_index"])]
        episode_tick = int(ticks["episode_tick"].iloc[index])
        true_s = (slot_of[episode_tick] - first_slot) * period
        assert abs(part["start_s"] + float(row["timestamp"]) - true_s) < 1e-4, (index, episode_tick, part)
        np.testing.assert_allclose(row["observation.state"].numpy(), np.arange(len(names)) + episode_tick)
    # The images are the ticks' own: the first frame of each part decodes to its tick's picture.
    for part in parts:
        frame = dataset[int(part["from_frame"])]
        episode_tick = int(ticks["episode_tick"].iloc[int(part["from_frame"])])
        image = frame["observation.images.front"].permute(1, 2, 0).numpy()
        assert np.abs(image - image_for(0, episode_tick).astype(np.float32) / 255.0).mean() < 0.06


def test_a_recording_in_parts_and_video_segments_is_what_lerobot_reads_and_merges(tmp_path: Path) -> None:
    """Parts (LeRobot episodes) over two video segments (a recorder restart): LeRobot's reader finds each
    part's frames in its own segment's file, and its merger keeps them."""
    from lerobot.datasets.aggregate import aggregate_datasets

    from common.wire.contract import image_key
    from nodes.recorder.lerobot_v3 import OneEpisodeDataset
    from nodes.recorder.parts import split_parts
    from nodes.recorder.video import VideoResult

    config = load_config(small_config(tmp_path))
    root = tmp_path / "episode_000000"
    # Ticks 0-5 in segment 0 (a gap after tick 2: writer behind), then ticks 9-13 in segment 1 (a restart).
    ticks = [0, 1, 2, 4, 5, 6, 9, 10, 11, 12, 13]
    first = OneEpisodeDataset(config, root, "h264", "ultrafast", segment=0)
    second: OneEpisodeDataset | None = None
    for index, k in enumerate(ticks):
        if index == 6:
            closed = first.close()
            second = OneEpisodeDataset(config, root, "h264", "ultrafast", segment=1)
            second.states, second.actions = list(first.states), list(first.actions)
        target = second or first
        state = np.arange(6, dtype=np.float32) + k
        target.add_frame({image_key(camera): image_for(c, k) for c, camera in enumerate(config.cameras)}, state,
                         state + 1)
    assert second is not None
    videos = second.close()
    for key, video in videos.items():
        video.histogram.counts += closed[key].histogram.counts
    rows = [{"t": 100.0 + k / config.fps, "lateness_s": 0.0, "episode_tick": k} for k in ticks]
    parts = split_parts(rows, config.fps, breaks=[6])
    assert [(p["from_frame"], p["frames"], p["segment"]) for p in parts] == [(0, 3, 0), (3, 3, 0), (6, 5, 1)]
    second.save(config.task, {key: VideoResult(frames=len(ticks), codec=v.codec, histogram=v.histogram)
                              for key, v in videos.items()}, parts=parts, segments=[6, 5])

    dataset = load_dataset(root)
    assert dataset.num_episodes == 3 and dataset.num_frames == len(ticks)
    for index, k in enumerate(ticks):
        row = dataset[index]
        part = parts[int(row["episode_index"])]
        assert abs(part["start_s"] + float(row["timestamp"]) - (k - ticks[0]) / config.fps) < 1e-4
        image = row["observation.images.front"].permute(1, 2, 0).numpy()
        assert np.abs(image - image_for(0, k).astype(np.float32) / 255.0).mean() < 0.06, k
    aggregate_datasets(repo_ids=["armpipe/a", "armpipe/b"], aggr_repo_id="armpipe/all", roots=[root, root],
                       aggr_root=tmp_path / "all")
    merged = load_dataset(tmp_path / "all")
    assert merged.num_episodes == 6 and merged.num_frames == 2 * len(ticks)
    image = merged[len(ticks) + 7]["observation.images.wrist"].permute(1, 2, 0).numpy()
    assert np.abs(image - image_for(1, ticks[7]).astype(np.float32) / 255.0).mean() < 0.06


def test_a_restarts_downtime_counts_the_ticks_the_actuator_ran_not_the_slots_it_skipped() -> None:
    """The actuator fell behind during a recorder restart and skipped a slot: the part after the restart
    starts one slot later in true time (its gap_ticks), but the ticks of the downtime (recorder_restarted)
    are the episode_tick numbers the actuator ran, which its backlog fills in: one fewer. (Counted from the
    part's gap, a loaded machine's run once had recorder_restarted 38 with 37 ticks filled.)"""
    from nodes.recorder.parts import split_parts
    from nodes.recorder.records import DROP_RECORDER_RESTARTED, DROP_WRITER_BEHIND
    from nodes.recorder.segments import count_restarts

    fps = 30.0
    # episode_tick k ran in slot k, but from tick 10 on one slot later (slot 10 skipped); ticks 6-12 not recorded.
    ticks = [0, 1, 2, 3, 4, 5, 13, 14, 15]
    rows = [{"t": 100.0 + (k + (k >= 10)) / fps, "lateness_s": 0.0, "episode_tick": k} for k in ticks]
    parts = split_parts(rows, fps, breaks=[6])
    assert [(p["from_frame"], p["gap_ticks"], p["segment"]) for p in parts] == [(0, 0, 0), (6, 8, 1)]
    counted = count_restarts({DROP_RECORDER_RESTARTED: 3, DROP_WRITER_BEHIND: 2}, rows, [6])
    assert counted == {DROP_RECORDER_RESTARTED: 7, DROP_WRITER_BEHIND: 2}


def test_ticks_whose_phase_drifts_off_the_grid_are_cut_so_no_frame_is_half_a_period_off() -> None:
    """The actuator's pacer moves ticks to follow the data (here a camera slower than the loop: every tick a
    tenth of a period later than the grid). No tick is missing, yet on one 1/fps grid the frames would run
    ahead of true time without bound: a part is cut where a tick is more than half a period off its grid."""
    from nodes.recorder.parts import MAX_DRIFT_PERIODS, split_parts

    fps = 30.0
    period = 1.0 / fps
    rows = [{"t": 5.0 + k * 1.1 * period, "lateness_s": 0.0, "episode_tick": k} for k in range(40)]
    parts = split_parts(rows, fps)
    assert len(parts) > 1 and all(part["gap_ticks"] == 0 for part in parts)
    assert sum(part["frames"] for part in parts) == len(rows)
    for part in parts:
        for offset in range(part["frames"]):
            true_s = rows[part["from_frame"] + offset]["t"] - rows[0]["t"]
            assert abs(part["start_s"] + offset * period - true_s) <= MAX_DRIFT_PERIODS * period + 1e-9
    # Ticks on the grid (late by their lateness_s, as the actuator reports it) are never cut for drift.
    on_grid = [{"t": 5.0 + k * period + 0.004 * (k % 3), "lateness_s": 0.004 * (k % 3), "episode_tick": k}
               for k in range(40)]
    assert len(split_parts(on_grid, fps)) == 1
