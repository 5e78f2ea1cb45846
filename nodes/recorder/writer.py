"""One recorded episode on disk: a LeRobot v3 dataset of its own, a journal, and side files.

Why one dataset per episode: LeRobot 0.6.1's writer keeps a ParquetWriter open across episodes and
buffers episode metadata until ``finalize()``, so a process killed mid-recording can leave a shared
data file without its footer and lose *every* episode in it. Here each episode is written into its own
work directory, finalised, and only then renamed into place (an atomic ``rename`` on one filesystem).
A finished episode is never opened for writing again, so no later crash can damage it.

Layout under ``recorder.output_dir``::

    episode_000000/            a complete LeRobot v3 dataset (meta/, data/, videos/) with one episode
        armpipe/ticks.parquet  one row per recorded tick: hold, lateness, queue depth, ground truth, ...
        armpipe/chunks.parquet one row per chunk the actuator received: rows, round trip, policy timings
        armpipe/episode.json   the episode's metrics (also a line of ../metrics.jsonl)
        armpipe/plots/*.png
    .work/episode_000001/      the episode being recorded: LeRobot's PNG staging images + journal.jsonl

The journal (``journal.jsonl``: start, every tick's state/action/metadata, chunks, stop) is appended as
the episode runs. If the recorder dies, the next start rebuilds the episode from the journal and the
PNGs that are complete on disk (``recover_episode``): only the unfinished tail is lost.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.config import DeploymentConfig
from common.wire.contract import ACTION_KEY, STATE_KEY, image_key

log = logging.getLogger(__name__)

WORK_DIR = ".work"
SIDE_DIR = "armpipe"
OUTCOME_FILE = "outcome.json"
EPISODE_METRICS = "episode.json"  # written last, by the recorder: its absence means metrics are still due
JOURNAL = "journal.jsonl"
EPISODE_PREFIX = "episode_"
# The LeRobot episode index inside each one-episode dataset.
DATASET_EPISODE = 0
# LeRobot's PNG staging path of a frame (lerobot.datasets.utils.DEFAULT_IMAGE_PATH), with our episode 0.
_STAGING_IMAGE = "images/{image_key}/episode-{episode:06d}/frame-{frame:06d}.png"


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
    images: dict[str, np.ndarray]  # camera -> uint8 HxWx3 RGB, or JPEG bytes when camera in jpeg
    jpeg: set[str] = field(default_factory=set)
    ground_truth: np.ndarray | None = None  # the dataset's action for frame_index when replaying
    inputs: dict[str, int] = field(default_factory=dict)
    inputs_matched: bool = True  # every frame/state named in ``inputs`` was found (else the newest was used)


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
    dropped_ticks: int
    recovered: bool
    path: Path


def dataset_features(config: DeploymentConfig) -> dict[str, dict]:
    """LeRobot features of a recording: each camera at its configured size, state and executed action."""
    names = config.state_names()
    features: dict[str, dict] = {
        image_key(name): {"dtype": "video", "shape": (cam.height, cam.width, 3),
                          "names": ["height", "width", "channels"]}
        for name, cam in config.cameras.items()
    }
    features[STATE_KEY] = {"dtype": "float32", "shape": (len(names),), "names": names}
    features[ACTION_KEY] = {"dtype": "float32", "shape": (len(config.action_names()),),
                            "names": config.action_names()}
    return features


def _create_dataset(config: DeploymentConfig, root: Path, vcodec: str, image_writer_threads: int) -> Any:
    from lerobot.configs.video import RGBEncoderConfig
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    return LeRobotDataset.create(
        repo_id=f"armpipe/{config.task}-{root.name}",
        fps=config.fps,
        features=dataset_features(config),
        root=root,
        robot_type="bi_so101_follower" if len(config.arms) > 1 else "so101_follower",
        use_videos=True,
        rgb_encoder=RGBEncoderConfig(vcodec=vcodec),
        image_writer_threads=image_writer_threads,
        video_backend=config.player.video_backend,
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return value


class EpisodeWriter:
    """Writes one episode: LeRobot ``add_frame`` per tick plus the journal; ``finish`` makes it final."""

    def __init__(self, config: DeploymentConfig, output_dir: Path, info: EpisodeInfo, *, vcodec: str = "h264",
                 image_writer_threads: int = 2) -> None:
        self.config = config
        self.output_dir = output_dir
        self.info = info
        self.root = output_dir / WORK_DIR / info.name
        self.root.parent.mkdir(parents=True, exist_ok=True)
        self.dataset = _create_dataset(config, self.root, vcodec, image_writer_threads)
        self.features = dataset_features(config)
        self.task = config.task
        self.journal = (self.root / JOURNAL).open("a", encoding="utf-8")
        self.frames = 0
        self.tick_rows: list[dict[str, Any]] = []
        self.chunk_rows: list[dict[str, Any]] = []
        self.hold_events: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.dropped_ticks = 0
        self.label = ""
        self.stop_reason = ""
        self.ended_t = 0.0
        self.ended_wall = 0.0
        self._write_journal({"type": "start", **asdict(info), "vcodec": vcodec})

    # ------------------------------------------------------------------ recording
    def _write_journal(self, entry: dict[str, Any]) -> None:
        # Flushed to the OS on every line: a killed process loses nothing already written (no fsync:
        # surviving a power cut is not the goal, surviving kill -9 is).
        self.journal.write(json.dumps(entry, default=_jsonable, separators=(",", ":")) + "\n")
        self.journal.flush()

    def pending_images(self) -> int:
        """Images queued for LeRobot's PNG writer threads (the writer back-pressures on this)."""
        image_writer = getattr(self.dataset.writer, "image_writer", None)
        return image_writer.queue.qsize() if image_writer is not None else 0

    def add_tick(self, tick: TickRecord) -> None:
        """Add one frame; raises ``TickRejected`` (the episode carries on) for a tick that does not fit."""
        from common.wire.images import decode_jpeg

        frame: dict[str, Any] = {}
        for camera in self.config.cameras:
            image = tick.images.get(camera)
            if image is None:
                raise TickRejected(f"images.{camera}", "no frame of this camera was received")
            if camera in tick.jpeg:
                image = decode_jpeg(image, f"images.{camera}")
            expected = tuple(self.features[image_key(camera)]["shape"])
            if image.shape != expected or image.dtype != np.uint8:
                raise TickRejected(f"images.{camera}", f"expected uint8 {list(expected)} as configured in "
                                   f"cameras.{camera}, got {image.dtype}{list(image.shape)}")
            frame[image_key(camera)] = image
        for key, value in ((STATE_KEY, tick.state), (ACTION_KEY, tick.action)):
            expected_dim = self.features[key]["shape"][0]
            if value.shape != (expected_dim,):
                raise TickRejected(key, f"expected {expected_dim} values, got shape {list(value.shape)}")
            if not np.all(np.isfinite(value)):
                raise TickRejected(key, "expected finite values, got NaN or inf")
            frame[key] = np.asarray(value, dtype=np.float32)
        frame["task"] = self.task
        self.dataset.add_frame(frame)
        row = {
            "frame": self.frames, "tick": tick.tick, "t": tick.t, "obs_t": tick.obs_t, "hold": tick.hold,
            "hold_reason": tick.hold_reason, "queue_depth": tick.queue_depth, "lateness_s": tick.lateness_s,
            "frame_index": tick.frame_index, "actuator_episode": tick.actuator_episode,
            "action": tick.action.astype(np.float32).tolist(), "state": tick.state.astype(np.float32).tolist(),
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

    def add_hold_event(self, reason: str) -> None:
        self.hold_events[reason] = self.hold_events.get(reason, 0) + 1
        self._write_journal({"type": "hold", "reason": reason})

    def stop(self, label: str, reason: str, ended_t: float, dropped_ticks: int) -> None:
        self.label, self.stop_reason, self.ended_t = label, reason, ended_t
        self.ended_wall = time.time()
        self.dropped_ticks = dropped_ticks
        self._write_journal({"type": "stop", "label": label, "reason": reason, "ended_t": ended_t,
                             "ended_wall": self.ended_wall, "dropped_ticks": dropped_ticks,
                             "rejected": self.rejected})

    # ------------------------------------------------------------------ finishing
    def finish(self) -> EpisodeOutcome | None:
        """Encode and finalise the dataset, write the side files, move it into place.

        Returns None for an episode without a single frame (nothing to save; its work dir is removed).
        """
        self.journal.close()
        if self.frames == 0:
            self.dataset.writer.stop_image_writer()
            shutil.rmtree(self.root, ignore_errors=True)
            log.warning("%s: no frames recorded; nothing saved", self.info.name)
            return None
        started = time.monotonic()
        # parallel_encoding=False: LeRobot would fork a process pool from this multi-threaded process.
        self.dataset.save_episode(parallel_encoding=False)
        self.dataset.finalize()
        log.info("%s: %d frames encoded and finalised in %.1f s", self.info.name, self.frames,
                 time.monotonic() - started)
        return _complete(self.output_dir, self.root, self.info, label=self.label, stop_reason=self.stop_reason,
                         ended_t=self.ended_t, ended_wall=self.ended_wall, frames=self.frames,
                         tick_rows=self.tick_rows, chunk_rows=self.chunk_rows, hold_events=self.hold_events,
                         rejected=self.rejected, dropped_ticks=self.dropped_ticks, recovered=False)

    def abandon(self) -> None:
        """Close files without saving (shutdown with an episode still open keeps the journal for recovery)."""
        self.journal.close()
        if self.dataset.writer.image_writer is not None:
            self.dataset.writer.image_writer.wait_until_done()
            self.dataset.writer.stop_image_writer()


def _complete(output_dir: Path, root: Path, info: EpisodeInfo, *, label: str, stop_reason: str, ended_t: float,
              ended_wall: float, frames: int, tick_rows: list[dict[str, Any]], chunk_rows: list[dict[str, Any]],
              hold_events: dict[str, int], rejected: dict[str, int], dropped_ticks: int,
              recovered: bool) -> EpisodeOutcome:
    """Write the side files into a finalised dataset root and rename it into ``output_dir``."""
    side = root / SIDE_DIR
    side.mkdir(exist_ok=True)
    ticks = pd.DataFrame(tick_rows)
    if "inputs" in ticks:
        ticks["inputs"] = ticks["inputs"].map(lambda value: json.dumps(value, sort_keys=True))
    chunks = pd.DataFrame(chunk_rows)
    ticks.to_parquet(side / "ticks.parquet")
    chunks.to_parquet(side / "chunks.parquet")
    # Enough to redo the metrics if the process dies between the rename below and writing them.
    (side / OUTCOME_FILE).write_text(json.dumps({
        "info": asdict(info), "label": label, "stop_reason": stop_reason, "ended_t": ended_t,
        "ended_wall": ended_wall, "frames": frames, "hold_events": hold_events, "rejected": rejected,
        "dropped_ticks": dropped_ticks, "recovered": recovered}))
    shutil.rmtree(root / "images", ignore_errors=True)  # LeRobot's PNG staging, now encoded into videos
    (root / JOURNAL).unlink(missing_ok=True)
    final = output_dir / info.name
    if final.exists():  # a finished episode is never overwritten; keep both
        final = output_dir / f"{info.name}-{int(time.time())}"
    root.rename(final)
    return EpisodeOutcome(info=info, label=label, stop_reason=stop_reason, ended_t=ended_t, ended_wall=ended_wall,
                          frames=frames, ticks=ticks, chunks=chunks, hold_events=hold_events,
                          rejected_ticks=rejected, dropped_ticks=dropped_ticks, recovered=recovered, path=final)


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
    saved = json.loads((path / SIDE_DIR / OUTCOME_FILE).read_text())
    info = EpisodeInfo(**saved["info"])
    return EpisodeOutcome(info=info, label=saved["label"], stop_reason=saved["stop_reason"], ended_t=saved["ended_t"],
                          ended_wall=saved["ended_wall"], frames=saved["frames"],
                          ticks=pd.read_parquet(path / SIDE_DIR / "ticks.parquet"),
                          chunks=pd.read_parquet(path / SIDE_DIR / "chunks.parquet"),
                          hold_events=saved["hold_events"], rejected_ticks=saved["rejected"],
                          dropped_ticks=saved["dropped_ticks"], recovered=saved["recovered"], path=path)


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


def _read_png(path: Path) -> np.ndarray | None:
    """The PNG as uint8 RGB, or None when it is missing or was cut short by the crash."""
    import PIL.Image

    try:
        with PIL.Image.open(path) as image:
            image.load()  # raises on a truncated file (LOAD_TRUNCATED_IMAGES is off by default)
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError):
        return None


def recover_episode(config: DeploymentConfig, output_dir: Path, work_root: Path, *, vcodec: str = "h264",
                    image_writer_threads: int = 2) -> EpisodeOutcome | None:
    """Rebuild a finished LeRobot dataset from a dead recorder's work directory.

    Frames are taken in order while the journal has the tick and every camera's PNG is complete; the
    first incomplete tick ends the episode (the unfinished tail). The work directory is removed after
    the rebuilt episode is in place; without a single complete frame it is removed with a warning.
    """
    journal_path = work_root / JOURNAL
    entries: list[dict[str, Any]] = []
    if journal_path.exists():
        for line in journal_path.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                break  # the line being written when the process died
    start = next((entry for entry in entries if entry.get("type") == "start"), None)
    if start is None:
        log.warning("%s: no journal start entry; removing the unusable work directory", work_root)
        shutil.rmtree(work_root, ignore_errors=True)
        return None
    info = EpisodeInfo(**{key: start[key] for key in EpisodeInfo.__dataclass_fields__ if key in start})
    rebuild_root = work_root.with_name(work_root.name + ".rebuild")
    shutil.rmtree(rebuild_root, ignore_errors=True)
    dataset = _create_dataset(config, rebuild_root, start.get("vcodec", vcodec), image_writer_threads)
    tick_rows: list[dict[str, Any]] = []
    chunk_rows: list[dict[str, Any]] = []
    hold_events: dict[str, int] = {}
    stop: dict[str, Any] = {}
    ticks_in_journal = sum(1 for entry in entries if entry.get("type") == "tick")
    complete = True
    for entry in entries:
        kind = entry.pop("type", "")
        if kind == "tick" and complete:
            images = {}
            for camera in config.cameras:
                path = work_root / _STAGING_IMAGE.format(image_key=image_key(camera), episode=DATASET_EPISODE,
                                                         frame=entry["frame"])
                image = _read_png(path)
                if image is None:
                    complete = False
                    break
                images[image_key(camera)] = image
            if not complete:
                continue
            dataset.add_frame({**images, STATE_KEY: np.asarray(entry["state"], dtype=np.float32),
                               ACTION_KEY: np.asarray(entry["action"], dtype=np.float32), "task": config.task})
            entry["frame"] = len(tick_rows)
            tick_rows.append(entry)
        elif kind == "chunk":
            chunk_rows.append(entry)
        elif kind == "hold":
            hold_events[entry["reason"]] = hold_events.get(entry["reason"], 0) + 1
        elif kind == "stop":
            stop = entry
    if not tick_rows:
        dataset.finalize()
        shutil.rmtree(rebuild_root, ignore_errors=True)
        # Kept (renamed out of the way, never retried) so a person can look at what was left.
        kept = work_root.with_name(f"{work_root.name}.unrecoverable")
        work_root.rename(kept)
        log.warning("%s: none of %d journaled ticks has all its frames on disk; nothing to recover (left in %s)",
                    info.name, ticks_in_journal, kept)
        return None
    dataset.save_episode(parallel_encoding=False)
    dataset.finalize()
    last_t = float(tick_rows[-1]["t"])
    outcome = _complete(output_dir, rebuild_root, info, label=stop.get("label", ""),
                        stop_reason=stop.get("reason", "recorder_crashed"), ended_t=stop.get("ended_t", last_t),
                        ended_wall=stop.get("ended_wall", time.time()), frames=len(tick_rows), tick_rows=tick_rows,
                        chunk_rows=chunk_rows, hold_events=hold_events, rejected=stop.get("rejected", {}),
                        dropped_ticks=int(stop.get("dropped_ticks", 0)) + ticks_in_journal - len(tick_rows),
                        recovered=True)
    shutil.rmtree(work_root, ignore_errors=True)
    log.warning("%s: recovered %d of %d journaled frames after a recorder crash", info.name, len(tick_rows),
                ticks_in_journal)
    return outcome
