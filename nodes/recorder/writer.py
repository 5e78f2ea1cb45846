"""One recorded episode on disk: a LeRobot v3 dataset of its own, a journal, and side files.

Why one dataset per episode: LeRobot 0.6.1's writer keeps a ParquetWriter open across episodes and
buffers episode metadata until ``finalize()``, so a process killed mid-recording can leave a shared
data file without its footer and lose *every* episode in it. Here each episode is written into its own
work directory, finalised, and only then renamed into place (an atomic ``rename`` on one filesystem).
A finished episode is never opened for writing again, so no later crash can damage it.

The files are LeRobot 0.6.1's v3 layout, written by ``OneEpisodeDataset`` (``nodes.recorder.lerobot_v3``)
with pyarrow and PyAV rather than through ``LeRobotDataset`` (which imports torch: the recorder is a robot-side node and
never loads it). ``LeRobotDataset`` opens every finished episode.

Layout under ``recorder.output_dir``::

    episode_000000/            a complete LeRobot v3 dataset (meta/, data/, videos/) with one episode
        armpipe/ticks.parquet  one row per recorded tick: hold, lateness, queue depth, ground truth, ...
        armpipe/chunks.parquet one row per chunk the actuator received: rows, round trip, policy timings
        armpipe/latency.parquet one row per goal the actuator wrote to the bus: tick, row, capture -> written
                               and every stage (the actuator's ``latency`` events, docs/protocol.md section 8)
        armpipe/episode.json   the episode's metrics (also a line of ../metrics.jsonl)
        armpipe/plots/*.png
    .work/episode_000001/      the episode being recorded: stream/<camera>.mp4 (fragmented, encoded as the
                               episode runs; nodes.recorder.video) + journal.jsonl

The journal (``journal.jsonl``: start, every tick's state/action/metadata, chunks, stop) is appended as
the episode runs. If the recorder dies, the next start rebuilds the episode from the journal and the
frames every camera's stream has on disk (``recover_episode``): only the unfinished tail is lost.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from common.config import DeploymentConfig
from common.layout import dataset_features
from common.wire.contract import ACTION_KEY, STATE_KEY, image_key
from common.wire.images import JpegImage
from nodes.recorder.journal import JournalState, jsonable
from nodes.recorder.lerobot_v3 import OneEpisodeDataset
from nodes.recorder.parts import split_parts
from nodes.recorder.records import (
    JOURNAL,
    WORK_DIR,
    ChunkRecord,
    EpisodeInfo,
    EpisodeOutcome,
    LatencyRecord,
    TickRecord,
    TickRejected,
)
from nodes.recorder.segments import count_restarts, segment_breaks, segment_histograms
from nodes.recorder.side_files import complete_episode
from nodes.recorder.video import VideoResult

log = logging.getLogger(__name__)


class EpisodeWriter:
    """Writes one episode: a dataset frame per tick plus the journal; ``finish`` makes it final.

    With ``resume`` (the journal of the same episode, left by a recorder that was restarted while it ran),
    the recording goes on in the same work directory: what the journal and the streams hold is kept, the
    camera encoders start a new video segment, and the ticks missed meanwhile leave a gap (a new part).
    """

    def __init__(self, config: DeploymentConfig, output_dir: Path, info: EpisodeInfo, *, vcodec: str = "h264",
                 video_preset: str = "ultrafast", resume: JournalState | None = None) -> None:
        self.config = config
        self.output_dir = output_dir
        self.info = info
        self.root = output_dir / WORK_DIR / info.name
        self.root.parent.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            vcodec = resume.vcodec
            # Segments without a frame on disk are kept (empty) so the numbering of the streams stays as on disk.
            self._rewrite_journal(resume)
        self.segment_frames: list[int] = resume.segment_frames if resume is not None else []
        self.dataset = OneEpisodeDataset(config, self.root, vcodec, video_preset, segment=len(self.segment_frames))
        self.features = dataset_features(config)
        # The episode's task in the dataset (meta/tasks, task_index): the instruction it ran with, else the task name.
        self.task = info.task or config.task
        self.journal = (self.root / JOURNAL).open("a", encoding="utf-8")
        self.frames = 0
        self.tick_rows: list[dict[str, Any]] = []
        self.chunk_rows: list[dict[str, Any]] = []
        self.latency_rows: list[dict[str, Any]] = []
        self.hold_events: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.backlog_max_ticks = 0
        self.label = ""
        self.stop_reason = ""
        self.ended_t = 0.0
        self.ended_wall = 0.0
        self.gap_rows: list[dict[str, Any]] = []
        if resume is None:
            self._write_journal({"type": "start", **asdict(info), "vcodec": vcodec})
            return
        for row in resume.tick_rows:
            self.dataset.states.append(np.asarray(row["state"], dtype=np.float32))
            self.dataset.actions.append(np.asarray(row["action"], dtype=np.float32))
        self.tick_rows, self.frames = resume.tick_rows, resume.frames
        self.chunk_rows, self.latency_rows = resume.chunk_rows, resume.latency_rows
        self.hold_events, self.gap_rows = resume.hold_events, resume.gap_rows
        self._write_journal({"type": "segment", "index": len(self.segment_frames), "resumed_wall": time.time()})

    def _rewrite_journal(self, state: JournalState) -> None:
        """The journal as it is kept: each segment's ticks cut to its frames on disk (what a restart loses
        from the tail is filled from the actuator's backlog, without frames), replaced atomically."""
        lines = [{"type": "start", **asdict(state.info), "vcodec": state.vcodec}]
        for segment, rows in enumerate(state.segments):
            if segment:
                lines.append({"type": "segment", "index": segment})
            lines += [{"type": "tick", **row} for row in rows]
        lines += [{"type": "gap_tick", **row} for row in state.gap_rows]
        lines += [{"type": "chunk", **row} for row in state.chunk_rows]
        lines += [{"type": "latency", **row} for row in state.latency_rows]
        lines += [{"type": "hold", "reason": reason} for reason, count in state.hold_events.items()
                  for _ in range(count)]
        tmp = self.root / f"{JOURNAL}.tmp"
        tmp.write_text("".join(json.dumps(line, default=jsonable, separators=(",", ":")) + "\n" for line in lines),
                       encoding="utf-8")
        tmp.replace(self.root / JOURNAL)

    def abandon(self, *, discard: bool = False) -> None:
        """Stop writing (encoders and journal closed; ``discard``: frames not yet encoded dropped) and leave the
        work directory for recovery at the next start."""
        try:
            self.dataset.close(discard=discard)
        except RuntimeError as exc:
            log.warning("%s: %s", self.info.name, exc)
        self.journal.close()

    def suspend(self) -> None:
        """The recorder is restarted while the episode runs: streams closed complete, journal marked, work
        directory left for the next process (``replay_journal``)."""
        self._write_journal({"type": "suspend", "wall": time.time()})
        self.abandon(discard=True)  # quick: the next process is back sooner; the backlog fills those ticks

    def add_gap_ticks(self, rows: list[dict[str, Any]]) -> None:
        """Ticks that ran while the recorder was down, from the actuator's backlog: kept (gap_ticks.parquet,
        journaled), never dataset frames (no images)."""
        for row in rows:
            self.gap_rows.append(row)
            self._write_journal({"type": "gap_tick", **row})

    # ------------------------------------------------------------------ recording
    def _write_journal(self, entry: dict[str, Any]) -> None:
        # Flushed to the OS on every line: a killed process loses nothing already written (no fsync:
        # surviving a power cut is not the goal, surviving kill -9 is).
        self.journal.write(json.dumps(entry, default=jsonable, separators=(",", ":")) + "\n")
        self.journal.flush()

    def pending_images(self) -> int:
        """Frames queued for the camera encoders."""
        return self.dataset.pending_images()

    def add_tick(self, tick: TickRecord) -> None:
        """Add one frame; raises ``TickRejected`` (the episode carries on) for a tick that does not fit."""
        frame: dict[str, Any] = {}
        for camera in self.config.cameras:
            image = tick.images.get(camera)
            if image is None:
                raise TickRejected(f"images.{camera}", "no frame of this camera was received")
            expected = tuple(self.features[image_key(camera)]["shape"])
            if isinstance(image, JpegImage):  # decoded by the camera's encoder thread, never here
                if image.shape != expected:
                    raise TickRejected(f"images.{camera}", f"expected a JPEG of {list(expected)} as configured in "
                                       f"cameras.{camera}, got one of {list(image.shape)}")
            elif image.shape != expected or image.dtype != np.uint8:
                raise TickRejected(f"images.{camera}", f"expected uint8 {list(expected)} as configured in "
                                   f"cameras.{camera}, got {image.dtype}{list(image.shape)}")
            frame[image_key(camera)] = image
        action = tick.action
        # A hold before the actuator knows where the arm is (start of an episode, before its bus writer read
        # the servos) commands nothing: its target is NaN. The arm stays where it is, so the frame's action is
        # the measured state, and the tick is marked ``commanded: false`` in ticks.parquet.
        commanded = bool(np.all(np.isfinite(action)))
        if not commanded and tick.hold and action.shape == tick.state.shape:
            action = tick.state
        for key, value in ((STATE_KEY, tick.state), (ACTION_KEY, action)):
            expected_dim = self.features[key]["shape"][0]
            if value.shape != (expected_dim,):
                raise TickRejected(key, f"expected {expected_dim} values, got shape {list(value.shape)}")
            if not np.all(np.isfinite(value)):
                raise TickRejected(key, "expected finite values, got NaN or inf")
            frame[key] = np.asarray(value, dtype=np.float32)
        self.dataset.add_frame({key: frame[key] for key in self.dataset.camera_keys}, frame[STATE_KEY],
                               frame[ACTION_KEY])
        row = {
            "frame": self.frames, "tick": tick.tick, "t": tick.t, "obs_t": tick.obs_t, "hold": tick.hold,
            "hold_reason": tick.hold_reason, "queue_depth": tick.queue_depth, "lateness_s": tick.lateness_s,
            "frame_index": tick.frame_index, "actuator_episode": tick.actuator_episode,
            "episode_tick": tick.episode_tick,
            "action": action.astype(np.float32).tolist(), "state": tick.state.astype(np.float32).tolist(),
            "commanded": commanded,
            "ground_truth": None if tick.ground_truth is None else tick.ground_truth.astype(np.float32).tolist(),
            "inputs": tick.inputs, "inputs_matched": tick.inputs_matched,
        }
        self.tick_rows.append(row)
        self.frames += 1
        self._write_journal({"type": "tick", **row})

    def reject(self, field_name: str) -> None:
        self.rejected[field_name] = self.rejected.get(field_name, 0) + 1

    def add_chunk(self, chunk: ChunkRecord) -> None:
        row = {"t": chunk.t, "obs_t": chunk.obs_t, "rows": chunk.rows, "dropped_stale": chunk.dropped_stale,
               "round_trip_s": chunk.round_trip_s, "queue_depth": chunk.queue_depth,
               **{f"policy_{name}": float(value) for name, value in chunk.timings.items()},
               "chunk": None if chunk.chunk is None else np.asarray(chunk.chunk, dtype=np.float32).tolist()}
        self.chunk_rows.append(row)
        self._write_journal({"type": "chunk", **row})

    def add_latency(self, latency: LatencyRecord) -> None:
        row = {"t": latency.t, "tick": latency.tick, "row": latency.row, "first_row": latency.first_row,
               "end_to_end_s": latency.end_to_end_s,
               **{f"stage_{name}_s": float(value) for name, value in latency.stages.items()}}
        self.latency_rows.append(row)
        self._write_journal({"type": "latency", **row})

    def add_hold_event(self, reason: str) -> None:
        self.hold_events[reason] = self.hold_events.get(reason, 0) + 1
        self._write_journal({"type": "hold", "reason": reason})

    def stop(self, label: str, reason: str, ended_t: float, dropped: dict[str, int],
             backlog_max_ticks: int = 0) -> None:
        """``dropped``: ticks of this episode not recorded, by why (``DROP_*``)."""
        self.label, self.stop_reason, self.ended_t = label, reason, ended_t
        self.ended_wall = time.time()
        self.dropped = dict(dropped)
        self.backlog_max_ticks = backlog_max_ticks
        self._write_journal({"type": "stop", "label": label, "reason": reason, "ended_t": ended_t,
                             "ended_wall": self.ended_wall, "dropped": self.dropped, "rejected": self.rejected,
                             "backlog_max_ticks": backlog_max_ticks})

    # ------------------------------------------------------------------ finishing
    def finish(self) -> EpisodeOutcome | None:
        """Encode and finalise the dataset, write the side files, move it into place.

        Returns None for an episode without a single frame (nothing to save; its work dir is removed).
        """
        self.journal.close()
        if self.frames == 0:
            self.dataset.close()
            shutil.rmtree(self.root, ignore_errors=True)
            log.warning("%s: no frames recorded; nothing saved", self.info.name)
            return None
        started = time.monotonic()
        live = self.dataset.close()  # this segment's encoders; earlier segments were closed by a restart
        segments = [*self.segment_frames, self.frames - sum(self.segment_frames)]
        videos = {key: VideoResult(frames=self.frames, codec=result.codec, histogram=result.histogram)
                  for key, result in live.items()}
        for key, video in videos.items():
            video.histogram.counts += segment_histograms(self.dataset, key, self.segment_frames).counts
        breaks = segment_breaks(segments)
        parts = split_parts(self.tick_rows, self.config.fps, lockstep=self.config.actuator.lockstep, breaks=breaks)
        self.dataset.save(self.task, videos, parts=parts, segments=segments)
        self.dropped = count_restarts(self.dropped, self.tick_rows, breaks)
        if len(parts) > 1:
            log.warning("%s: cut into %d parts at gaps in time (%s)", self.info.name, len(parts),
                        ", ".join(f"{p['gap_ticks']} tick(s) before {p['start_s']:.2f} s" for p in parts[1:]))
        log.info("%s: %d frames saved in %.1f s (videos were encoded as the episode ran)", self.info.name,
                 self.frames, time.monotonic() - started)
        return complete_episode(self.output_dir, self.root, self.info, label=self.label, stop_reason=self.stop_reason,
                         ended_t=self.ended_t, ended_wall=self.ended_wall, frames=self.frames,
                         tick_rows=self.tick_rows, chunk_rows=self.chunk_rows, latency_rows=self.latency_rows,
                         hold_events=self.hold_events,
                         rejected=self.rejected, dropped=self.dropped, recovered=False,
                         backlog_max_ticks=self.backlog_max_ticks, parts=parts, gap_rows=self.gap_rows,
                         resumed=len(self.segment_frames))
