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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.config import DeploymentConfig
from common.layout import dataset_features
from common.wire.contract import ACTION_KEY, STATE_KEY, image_key
from common.wire.images import JpegImage
from nodes.recorder.lerobot_v3 import STREAM_DIR, OneEpisodeDataset
from nodes.recorder.parts import split_parts

if TYPE_CHECKING:  # pandas is imported where a file is written: a restarted recorder is back sooner
    import pandas as pd
from nodes.recorder.video import (
    PixelHistogram,
    VideoResult,
    decoded_histogram,
    readable_frames,
)

log = logging.getLogger(__name__)

WORK_DIR = ".work"
SIDE_DIR = "armpipe"
OUTCOME_FILE = "outcome.json"
EPISODE_METRICS = "episode.json"  # written last, by the recorder: its absence means metrics are still due
JOURNAL = "journal.jsonl"
EPISODE_PREFIX = "episode_"
# Why ticks of an episode were not recorded (``EpisodeOutcome.dropped``; the metrics' dropped_ticks_by_reason).
DROP_WRITER_BEHIND = "writer_behind"  # more than recorder.queue_ticks waited for the writer
DROP_BEFORE_RECORDER = "before_recorder"  # the episode's first ticks ran before the recorder saw it
DROP_LOST = "lost_in_transit"  # gaps in the episode's tick numbers (messages the recorder never got)
DROP_RECORDER_CRASHED = "recorder_crashed"  # the unfinished tail of an episode cut by a crash
# Ticks that ran while the recorder restarted in the middle of the episode (it resumed the same recording):
# no frames, but their small streams are in gap_ticks.parquet where the actuator's backlog still had them.
DROP_RECORDER_RESTARTED = "recorder_restarted"
GAP_TICKS_FILE = "gap_ticks.parquet"


class TickRejected(ValueError):
    """A tick that cannot become a dataset frame; ``field`` names what was wrong."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass
class EpisodeInfo:
    name: str  # directory name, e.g. "episode_000003"
    recorder_index: int  # position in this output directory (0, 1, ...)
    actuator_episode: int  # the actuator's episode_index
    started_wall: float  # time.time() at episode_start
    started_t: float  # robot monotonic time of episode_start
    implicit_start: bool = False  # opened from executed ticks because the episode_start event was missed
    episode_id: str = ""  # the actuator's identity of the episode (a uuid; survives actuator restarts)
    task: str = ""  # the episode's instruction (episode_start's ``instruction``); "" -> the config's task name


@dataclass
class TickRecord:
    """One executed control tick and the observation it used."""

    tick: int
    t: float  # when the actuator published it (robot monotonic clock)
    obs_t: float
    hold: bool
    hold_reason: str
    queue_depth: int
    lateness_s: float
    frame_index: int  # the player's frame index of the frames used (-1 with live cameras)
    actuator_episode: int
    action: np.ndarray  # float32 (action_dim,): the target actually commanded
    state: np.ndarray  # float32 (state_dim,): every arm's state used for this tick, config order
    images: dict[str, np.ndarray | JpegImage]  # camera -> uint8 HxWx3 RGB, or the JPEG as the camera sent it
    ground_truth: np.ndarray | None = None  # the dataset's action for frame_index when replaying
    inputs: dict[str, int] = field(default_factory=dict)
    inputs_matched: bool = True  # every frame/state named in ``inputs`` was found (else the newest was used)
    episode_tick: int = -1  # the actuator's tick number within the episode (0 = its first tick)


@dataclass
class ChunkRecord:
    t: float
    obs_t: float
    rows: int
    dropped_stale: int
    round_trip_s: float
    queue_depth: int
    timings: dict[str, float]
    chunk: np.ndarray | None  # (n, action_dim) as the actuator received it


@dataclass
class LatencyRecord:
    """One ``latency`` event: a goal written to the bus, and how long each stage took."""

    t: float
    tick: int
    row: int
    first_row: bool
    end_to_end_s: float
    stages: dict[str, float]


@dataclass
class EpisodeOutcome:
    """What the finished episode looks like, for metrics."""

    info: EpisodeInfo
    label: str
    stop_reason: str
    ended_t: float
    ended_wall: float
    frames: int
    ticks: pd.DataFrame
    chunks: pd.DataFrame
    hold_events: dict[str, int]
    rejected_ticks: dict[str, int]
    dropped: dict[str, int]  # ticks of the episode not recorded, by why (DROP_*)
    recovered: bool
    path: Path
    backlog_max_ticks: int = 0  # the most ticks that waited for the writer during the episode
    parts: list[dict[str, Any]] = field(default_factory=list)  # nodes.recorder.parts.split_parts
    gap_ticks: int = 0  # ticks without frames filled in from the actuator's backlog (gap_ticks.parquet)
    resumed: int = 0  # recorder restarts this recording was resumed across

    @property
    def dropped_ticks(self) -> int:
        return int(sum(self.dropped.values()))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return value


def read_journal(work_root: Path) -> list[dict[str, Any]]:
    """The journal's entries up to the first line a killed process left unfinished."""
    entries: list[dict[str, Any]] = []
    path = work_root / JOURNAL
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                break  # the line being written when the process died
    return entries


@dataclass
class JournalState:
    """What a work directory holds: the episode's frames per video segment (each segment's ticks cut to the
    frames every camera's stream of that segment has on disk), its side rows and how it ended, if it did."""

    info: EpisodeInfo
    vcodec: str
    segments: list[list[dict[str, Any]]]  # tick rows (ticks.parquet rows) per video segment
    journaled: int  # tick entries in the journal, complete frames or not
    gap_rows: list[dict[str, Any]] = field(default_factory=list)
    chunk_rows: list[dict[str, Any]] = field(default_factory=list)
    latency_rows: list[dict[str, Any]] = field(default_factory=list)
    hold_events: dict[str, int] = field(default_factory=dict)
    stop: dict[str, Any] = field(default_factory=dict)
    suspended: bool = False  # the last process stopped on purpose (SIGTERM) rather than crashed

    @property
    def tick_rows(self) -> list[dict[str, Any]]:
        return [row for rows in self.segments for row in rows]

    @property
    def frames(self) -> int:
        return sum(len(rows) for rows in self.segments)

    @property
    def segment_frames(self) -> list[int]:
        return [len(rows) for rows in self.segments]

    @property
    def resumed(self) -> int:
        return len(self.segments) - 1


def replay_journal(config: DeploymentConfig, work_root: Path, vcodec: str = "h264") -> JournalState | None:
    """Read a work directory's journal and cut each segment's ticks to the frames on disk (None: no start entry)."""
    entries = read_journal(work_root)
    start = next((entry for entry in entries if entry.get("type") == "start"), None)
    if start is None:
        return None
    info = EpisodeInfo(**{key: start[key] for key in EpisodeInfo.__dataclass_fields__ if key in start})
    state = JournalState(info=info, vcodec=str(start.get("vcodec", vcodec)), segments=[[]], journaled=0)
    for entry in entries:
        kind = entry.pop("type", "")
        if kind == "tick":
            state.segments[-1].append(entry)
            state.journaled += 1
        elif kind == "segment":  # the recorder restarted and resumed: a new video segment starts here
            state.segments.append([])
            state.suspended = False
        elif kind == "suspend":
            state.suspended = True
        elif kind == "gap_tick":
            state.gap_rows.append(entry)
        elif kind == "chunk":
            state.chunk_rows.append(entry)
        elif kind == "latency":
            state.latency_rows.append(entry)
        elif kind == "hold":
            state.hold_events[entry["reason"]] = state.hold_events.get(entry["reason"], 0) + 1
        elif kind == "stop":
            state.stop = entry
    dataset = OneEpisodeDataset(config, work_root, state.vcodec, encode=False)
    for segment, rows in enumerate(state.segments):
        if rows:
            readable = min(readable_frames(dataset.stream_path(key, segment)) for key in dataset.camera_keys)
            del rows[readable:]
    return state


def segment_histograms(dataset: OneEpisodeDataset, key: str, segment_frames: list[int]) -> PixelHistogram:
    """The pixel histogram of a camera's frames in the segments given (decoded back from their streams)."""
    histogram = PixelHistogram()
    for segment, frames in enumerate(segment_frames):
        if frames:
            histogram.counts += decoded_histogram(dataset.stream_path(key, segment), frames).counts
    return histogram


def _segment_breaks(segment_frames: list[int]) -> list[int]:
    """The frame index where each video segment after the first starts."""
    return [int(start) for start in np.cumsum(segment_frames)[:-1]]


def _count_restarts(dropped: dict[str, int], rows: list[dict[str, Any]], breaks: list[int]) -> dict[str, int]:
    """``dropped`` with the ticks of every restart's downtime (where a video segment starts), counted from the
    recording itself (a killed process could not hand its count on): the actuator's ``episode_tick`` numbers
    between the last frame before the break and the first after it, the very ticks the backlog fills in.
    Not the part's ``gap_ticks``: that is the gap in true time, which also spans slots the actuator itself
    skipped (it fell behind) or a phase shift of its ticks, where no tick ran and nothing is to be filled."""
    restarted = 0
    for start in breaks:
        if 0 < start < len(rows):
            before, after = int(rows[start - 1].get("episode_tick", -1)), int(rows[start].get("episode_tick", -1))
            if before >= 0 and after >= 0:
                restarted += max(after - before - 1, 0)
    counted = {**dropped}
    counted.pop(DROP_RECORDER_RESTARTED, None)
    if restarted:
        counted[DROP_RECORDER_RESTARTED] = restarted
    return counted


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
        tmp.write_text("".join(json.dumps(line, default=_jsonable, separators=(",", ":")) + "\n" for line in lines),
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
        self.journal.write(json.dumps(entry, default=_jsonable, separators=(",", ":")) + "\n")
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
        breaks = _segment_breaks(segments)
        parts = split_parts(self.tick_rows, self.config.fps, lockstep=self.config.actuator.lockstep, breaks=breaks)
        self.dataset.save(self.task, videos, parts=parts, segments=segments)
        self.dropped = _count_restarts(self.dropped, self.tick_rows, breaks)
        if len(parts) > 1:
            log.warning("%s: cut into %d parts at gaps in time (%s)", self.info.name, len(parts),
                        ", ".join(f"{p['gap_ticks']} tick(s) before {p['start_s']:.2f} s" for p in parts[1:]))
        log.info("%s: %d frames saved in %.1f s (videos were encoded as the episode ran)", self.info.name,
                 self.frames, time.monotonic() - started)
        return _complete(self.output_dir, self.root, self.info, label=self.label, stop_reason=self.stop_reason,
                         ended_t=self.ended_t, ended_wall=self.ended_wall, frames=self.frames,
                         tick_rows=self.tick_rows, chunk_rows=self.chunk_rows, latency_rows=self.latency_rows,
                         hold_events=self.hold_events,
                         rejected=self.rejected, dropped=self.dropped, recovered=False,
                         backlog_max_ticks=self.backlog_max_ticks, parts=parts, gap_rows=self.gap_rows,
                         resumed=len(self.segment_frames))


def _complete(output_dir: Path, root: Path, info: EpisodeInfo, *, label: str, stop_reason: str, ended_t: float,
              ended_wall: float, frames: int, tick_rows: list[dict[str, Any]], chunk_rows: list[dict[str, Any]],
              hold_events: dict[str, int], rejected: dict[str, int], dropped: dict[str, int],
              recovered: bool, backlog_max_ticks: int = 0,
              latency_rows: list[dict[str, Any]] | None = None,
              parts: list[dict[str, Any]] | None = None, gap_rows: list[dict[str, Any]] | None = None,
              resumed: int = 0) -> EpisodeOutcome:
    """Write the side files into a finalised dataset root and rename it into ``output_dir``."""
    import pandas as pd

    side = root / SIDE_DIR
    side.mkdir(exist_ok=True)
    parts = parts or []
    for part in parts:  # which LeRobot episode (part) of the recording each frame is in
        for row in tick_rows[int(part["from_frame"]):int(part["from_frame"]) + int(part["frames"])]:
            row["part"] = int(part["part"])
    ticks = pd.DataFrame(tick_rows)
    if "inputs" in ticks:
        ticks["inputs"] = ticks["inputs"].map(lambda value: json.dumps(value, sort_keys=True))
    chunks = pd.DataFrame(chunk_rows)
    ticks.to_parquet(side / "ticks.parquet")
    chunks.to_parquet(side / "chunks.parquet")
    pd.DataFrame(latency_rows or [], columns=None if latency_rows else ["tick", "end_to_end_s"]).to_parquet(
        side / "latency.parquet")
    if gap_rows:  # ticks of a recorder's downtime, from the actuator's backlog (no frames)
        pd.DataFrame(gap_rows).to_parquet(side / GAP_TICKS_FILE)
    # Enough to redo the metrics if the process dies between the rename below and writing them.
    (side / OUTCOME_FILE).write_text(json.dumps({
        "info": asdict(info), "label": label, "stop_reason": stop_reason, "ended_t": ended_t,
        "ended_wall": ended_wall, "frames": frames, "hold_events": hold_events, "rejected": rejected,
        "dropped": dropped, "recovered": recovered, "backlog_max_ticks": backlog_max_ticks, "parts": parts,
        "gap_ticks": len(gap_rows or []), "resumed": resumed}))
    shutil.rmtree(root / STREAM_DIR, ignore_errors=True)  # the camera streams, now copied into videos/
    (root / JOURNAL).unlink(missing_ok=True)
    final = output_dir / info.name
    if final.exists():  # a finished episode is never overwritten; keep both
        final = output_dir / f"{info.name}-{int(time.time())}"
    root.rename(final)
    return EpisodeOutcome(info=info, label=label, stop_reason=stop_reason, ended_t=ended_t, ended_wall=ended_wall,
                          frames=frames, ticks=ticks, chunks=chunks, hold_events=hold_events,
                          rejected_ticks=rejected, dropped=dropped, recovered=recovered, path=final,
                          backlog_max_ticks=backlog_max_ticks, parts=parts, gap_ticks=len(gap_rows or []),
                          resumed=resumed)


# --------------------------------------------------------------------------------------------------
# Recovery after a crash
# --------------------------------------------------------------------------------------------------


def finished_without_metrics(output_dir: Path) -> list[Path]:
    """Finished episodes (renamed into place) whose metrics were never written: the process died between."""
    if not output_dir.is_dir():
        return []
    return sorted(path for path in output_dir.iterdir()
                  if path.is_dir() and path.name.startswith(EPISODE_PREFIX)
                  and (path / SIDE_DIR / OUTCOME_FILE).exists() and not (path / SIDE_DIR / EPISODE_METRICS).exists())


def load_outcome(path: Path) -> EpisodeOutcome:
    """The ``EpisodeOutcome`` of a finished episode directory, from its side files."""
    import pandas as pd

    saved = json.loads((path / SIDE_DIR / OUTCOME_FILE).read_text())
    info = EpisodeInfo(**saved["info"])
    return EpisodeOutcome(info=info, label=saved["label"], stop_reason=saved["stop_reason"], ended_t=saved["ended_t"],
                          ended_wall=saved["ended_wall"], frames=saved["frames"],
                          ticks=pd.read_parquet(path / SIDE_DIR / "ticks.parquet"),
                          chunks=pd.read_parquet(path / SIDE_DIR / "chunks.parquet"),
                          hold_events=saved["hold_events"], rejected_ticks=saved["rejected"],
                          dropped=saved.get("dropped", {}), recovered=saved["recovered"], path=path,
                          backlog_max_ticks=int(saved.get("backlog_max_ticks", 0)),
                          parts=list(saved.get("parts") or []), gap_ticks=int(saved.get("gap_ticks", 0)),
                          resumed=int(saved.get("resumed", 0)))


def pending_work(output_dir: Path) -> list[Path]:
    """Work directories left by a recorder that died (oldest first)."""
    work = output_dir / WORK_DIR
    if not work.is_dir():
        return []
    # Names with a dot are rebuilds in progress (``episode_000001.rebuild``), redone from their work dir.
    return sorted(path for path in work.iterdir()
                  if path.is_dir() and path.name.startswith(EPISODE_PREFIX) and "." not in path.name)


def next_recorder_index(output_dir: Path) -> int:
    """One more than the highest episode number under ``output_dir`` (finished or in the work dir)."""
    highest = -1
    for parent in (output_dir, output_dir / WORK_DIR):
        if not parent.is_dir():
            continue
        for path in parent.iterdir():
            digits = path.name.removeprefix(EPISODE_PREFIX).split("-")[0].split(".")[0]
            if path.name.startswith(EPISODE_PREFIX) and digits.isdigit():
                highest = max(highest, int(digits))
    return highest + 1


def recover_episode(config: DeploymentConfig, output_dir: Path, work_root: Path, *,
                    vcodec: str = "h264") -> EpisodeOutcome | None:
    """Rebuild a finished LeRobot dataset from a dead recorder's work directory, in place.

    Frames are taken in order while the journal has the tick and every camera's stream has the frame
    (a cut fragmented MP4 is readable up to its last complete fragment); the rest is the unfinished tail,
    counted in ``dropped`` as ``recorder_crashed``. The work directory becomes the episode; without a
    single complete frame it is renamed ``.unrecoverable`` and left for a person to look at.
    """
    state = replay_journal(config, work_root, vcodec)
    if state is None:
        log.warning("%s: no journal start entry; removing the unusable work directory", work_root)
        shutil.rmtree(work_root, ignore_errors=True)
        return None
    info, frames = state.info, state.frames
    dataset = OneEpisodeDataset(config, work_root, state.vcodec, encode=False)
    if frames == 0:
        # Kept (renamed out of the way, never retried) so a person can look at what was left.
        kept = work_root.with_name(f"{work_root.name}.unrecoverable")
        work_root.rename(kept)
        log.warning("%s: none of %d journaled ticks has every camera's frame on disk; nothing to recover "
                    "(left in %s)", info.name, state.journaled, kept)
        return None
    tick_rows = state.tick_rows
    for row in tick_rows:
        dataset.states.append(np.asarray(row["state"], dtype=np.float32))
        dataset.actions.append(np.asarray(row["action"], dtype=np.float32))
    videos = {key: VideoResult(frames=frames, codec="",
                               histogram=segment_histograms(dataset, key, state.segment_frames))
              for key in dataset.camera_keys}
    breaks = _segment_breaks(state.segment_frames)
    parts = split_parts(tick_rows, config.fps, lockstep=config.actuator.lockstep, breaks=breaks)
    dataset.save(info.task or config.task, videos, parts=parts, segments=state.segment_frames)
    stop = state.stop
    dropped = _count_restarts({str(k): int(v) for k, v in (stop.get("dropped") or {}).items()}, tick_rows,
                              breaks)
    if state.journaled > frames:
        dropped[DROP_RECORDER_CRASHED] = dropped.get(DROP_RECORDER_CRASHED, 0) + state.journaled - frames
    last_t = float(tick_rows[-1]["t"])
    outcome = _complete(output_dir, work_root, info, label=stop.get("label", ""),
                        stop_reason=stop.get("reason", "recorder_stopped" if state.suspended else "recorder_crashed"),
                        ended_t=stop.get("ended_t", last_t),
                        ended_wall=stop.get("ended_wall", time.time()), frames=frames, tick_rows=tick_rows,
                        chunk_rows=state.chunk_rows, latency_rows=state.latency_rows, hold_events=state.hold_events,
                        rejected=stop.get("rejected", {}), dropped=dropped, recovered=True,
                        backlog_max_ticks=int(stop.get("backlog_max_ticks", 0)), parts=parts,
                        gap_rows=state.gap_rows, resumed=state.resumed)
    log.warning("%s: recovered %d of %d journaled frames after a recorder crash", info.name, frames, state.journaled)
    return outcome
