"""One recorded episode on disk: a LeRobot v3 dataset of its own, a journal, and side files.

Why one dataset per episode: LeRobot 0.6.1's writer keeps a ParquetWriter open across episodes and
buffers episode metadata until ``finalize()``, so a process killed mid-recording can leave a shared
data file without its footer and lose *every* episode in it. Here each episode is written into its own
work directory, finalised, and only then renamed into place (an atomic ``rename`` on one filesystem).
A finished episode is never opened for writing again, so no later crash can damage it.

The files are LeRobot 0.6.1's v3 layout, written by ``OneEpisodeDataset`` with pyarrow, PyAV and PIL
rather than through ``LeRobotDataset`` (which imports torch: the recorder is a robot-side node and
never loads it). ``LeRobotDataset`` opens every finished episode.

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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

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
# LeRobot 0.6.1's v3 layout (lerobot.datasets.utils) and statistics (lerobot.datasets.compute_stats).
V3_CODEBASE_VERSION = "v3.0"
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
STATS_QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
VIDEO_ENCODER_ALIASES = {"av1": "libsvtav1"}  # lerobot.configs.video.VIDEO_CODECS_ALIASES


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


class OneEpisodeDataset:
    """The LeRobot v3 files of one episode, written without LeRobot's dataset classes.

    LeRobot's ``LeRobotDataset`` imports torch (and Hugging Face ``datasets``), which a robot-side node
    must not load; the files themselves are plain parquet, json and mp4, written here with the libraries
    LeRobot writes them with (pyarrow/pandas, PyAV, PIL) in LeRobot 0.6.1's layout:
    ``meta/info.json``, ``meta/stats.json``, ``meta/tasks.parquet``,
    ``meta/episodes/chunk-000/file-000.parquet``, ``data/chunk-000/file-000.parquet`` and
    ``videos/<camera key>/chunk-000/file-000.mp4``. ``LeRobotDataset(root=...)`` reads the result
    (tests/test_recorder.py does). Frames are staged as PNGs at LeRobot's staging path while the episode
    runs (a pool of writer threads, as LeRobot's image writer), so a crash leaves what
    ``recover_episode`` rebuilds from.
    """

    def __init__(self, config: DeploymentConfig, root: Path, vcodec: str, image_writer_threads: int) -> None:
        self.root = root
        self.fps = int(config.fps)
        self.features = dataset_features(config)
        self.camera_keys = [image_key(name) for name in config.cameras]
        self.robot_type = "bi_so101_follower" if len(config.arms) > 1 else "so101_follower"
        self.vcodec = vcodec
        self.video_backend = config.player.video_backend
        self.root.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=max(1, image_writer_threads), thread_name_prefix="png-writer")
        self._lock = threading.Lock()
        self._pending = 0
        self._write_errors: list[str] = []
        self.states: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []

    @property
    def frames(self) -> int:
        return len(self.states)

    def image_path(self, key: str, frame: int) -> Path:
        return self.root / _STAGING_IMAGE.format(image_key=key, episode=DATASET_EPISODE, frame=frame)

    def add_frame(self, images: dict[str, np.ndarray], state: np.ndarray, action: np.ndarray) -> None:
        """Queue the frame's PNGs (the arrays must not change afterwards) and keep its state and action."""
        frame = self.frames
        for key in self.camera_keys:
            path = self.image_path(key, frame)
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock:
                self._pending += 1
            self._pool.submit(self._write_png, images[key], path)
        self.states.append(np.asarray(state, dtype=np.float32))
        self.actions.append(np.asarray(action, dtype=np.float32))

    def _write_png(self, image: np.ndarray, path: Path) -> None:
        import PIL.Image

        try:
            PIL.Image.fromarray(image).save(path, compress_level=1)  # LeRobot's staging compression
        except Exception as exc:  # kept and raised by save(): a missing frame must not pass silently
            with self._lock:
                self._write_errors.append(f"{path}: {type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._pending -= 1

    def pending_images(self) -> int:
        with self._lock:
            return self._pending

    def close(self) -> None:
        """Wait for the queued PNGs and stop the writer threads (the staging stays on disk)."""
        self._pool.shutdown(wait=True)

    def save(self, task: str) -> None:
        """Encode the videos and write the parquet and json files of the finished episode."""
        self.close()
        if self._write_errors:
            raise RuntimeError(f"{len(self._write_errors)} staged frame(s) could not be written, first: "
                               f"{self._write_errors[0]}")
        count = self.frames
        if count == 0:
            raise ValueError("an episode without frames cannot be saved")
        video_info = {key: self._encode_video(key, count) for key in self.camera_keys}
        states, actions = np.stack(self.states), np.stack(self.actions)
        frame_index = np.arange(count, dtype=np.int64)
        columns: dict[str, np.ndarray] = {
            STATE_KEY: states, ACTION_KEY: actions,
            "timestamp": (frame_index / self.fps).astype(np.float32), "frame_index": frame_index,
            "episode_index": np.zeros(count, dtype=np.int64), "index": frame_index.copy(),
            "task_index": np.zeros(count, dtype=np.int64),
        }
        data = pa.table({name: pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
                         if values.ndim == 2 else pa.array(values) for name, values in columns.items()})
        data_path = self.root / V3_DATA_PATH.format(chunk_index=0, file_index=0)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(data, data_path)

        stats = {name: _feature_stats(values if values.ndim == 2 else values.reshape(-1, 1))
                 for name, values in columns.items()}
        for key in self.camera_keys:
            stats[key] = _image_stats([self.image_path(key, frame) for frame in _sample_frames(count)])
        episode: dict[str, Any] = {
            "episode_index": DATASET_EPISODE, "tasks": [task], "length": count,
            "data/chunk_index": 0, "data/file_index": 0, "dataset_from_index": 0, "dataset_to_index": count,
        }
        for key in self.camera_keys:
            episode.update({f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": 0,
                            f"videos/{key}/from_timestamp": 0.0, f"videos/{key}/to_timestamp": count / self.fps})
        for name, feature_stats in stats.items():
            episode.update({f"stats/{name}/{stat}": value for stat, value in feature_stats.items()})
        episode.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        episodes_path = self.root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
        episodes_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist([episode]), episodes_path)
        pd.DataFrame({"task_index": [0]}, index=pd.Index([task], name="task")).to_parquet(
            self.root / "meta" / "tasks.parquet")
        (self.root / "meta" / "stats.json").write_text(json.dumps(stats, indent=4))

        features: dict[str, Any] = json.loads(json.dumps(self.features))  # tuples -> lists, a private copy
        for key, info in video_info.items():
            features[key]["info"] = info
        features.update({"timestamp": {"dtype": "float32", "shape": [1], "names": None},
                         **{name: {"dtype": "int64", "shape": [1], "names": None}
                            for name in ("frame_index", "episode_index", "index", "task_index")}})
        info = {
            "codebase_version": V3_CODEBASE_VERSION, "fps": self.fps, "features": features,
            "total_episodes": 1, "total_frames": count, "total_tasks": 1, "chunks_size": 1000,
            "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
            "data_path": V3_DATA_PATH, "video_path": V3_VIDEO_PATH, "robot_type": self.robot_type,
            "splits": {"train": "0:1"},
        }
        (self.root / "meta" / "info.json").write_text(json.dumps(info, indent=4))

    def _encode_video(self, key: str, count: int) -> dict[str, Any]:
        """The staged PNGs of one camera as LeRobot encodes them (``encode_video_frames``: PyAV, GOP 2,
        CRF 30, yuv420p; preset 12 for libsvtav1); returns the feature's ``info`` block."""
        import av
        import PIL.Image

        encoder = VIDEO_ENCODER_ALIASES.get(self.vcodec, self.vcodec)
        options = {"g": "2", "crf": "30", **({"preset": "12"} if encoder == "libsvtav1" else {})}
        path = self.root / V3_VIDEO_PATH.format(video_key=key, chunk_index=0, file_index=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        height, width = self.features[key]["shape"][:2]
        with av.open(str(path), "w") as output:
            stream = output.add_stream(encoder, self.fps, options=options)
            stream.pix_fmt, stream.width, stream.height = "yuv420p", width, height
            for frame in range(count):
                with PIL.Image.open(self.image_path(key, frame)) as image:
                    output.mux(stream.encode(av.VideoFrame.from_image(image.convert("RGB"))))
            output.mux(stream.encode())
            codec = stream.codec_context.name
        return {"video.height": height, "video.width": width, "video.codec": codec, "video.pix_fmt": "yuv420p",
                "video.fps": self.fps, "video.channels": 3, "has_audio": False, "video.g": 2, "video.crf": 30,
                "video.preset": 12 if encoder == "libsvtav1" else None, "video.fast_decode": 0,
                "video.video_backend": self.video_backend, "video.extra_options": {}, "is_depth_map": False}


def _feature_stats(values: np.ndarray) -> dict[str, list]:
    """LeRobot's per-feature statistics of an (n, d) array: min, max, mean, std, count, q01..q99."""
    data = values.astype(np.float64)
    stats: dict[str, list] = {"min": data.min(axis=0).tolist(), "max": data.max(axis=0).tolist(),
                              "mean": data.mean(axis=0).tolist(), "std": data.std(axis=0).tolist(),
                              "count": [len(data)]}
    for quantile in STATS_QUANTILES:
        stats[f"q{round(quantile * 100):02d}"] = np.quantile(data, quantile, axis=0).tolist()
    return stats


def _sample_frames(count: int, most: int = 100) -> list[int]:
    """Evenly spaced frames for image statistics (LeRobot samples a subset as well)."""
    return sorted({round(index) for index in np.linspace(0, count - 1, min(count, most))})


def _image_stats(paths: list[Path]) -> dict[str, list]:
    """Per-channel statistics in [0, 1] with LeRobot's (3, 1, 1) shape, from frames downsampled to ~150 px."""
    import PIL.Image

    pixels = []
    for path in paths:
        with PIL.Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
        # compute_stats.auto_downsample_height_width: frames of 300 px or more are strided to ~150 px.
        side = max(array.shape[:2])
        step = side // 150 if side >= 300 else 1
        pixels.append(array[::step, ::step].reshape(-1, 3))
    flat = np.concatenate(pixels).astype(np.float64) / 255.0
    stats = _feature_stats(flat)  # count: sampled pixels, as LeRobot counts them
    return {name: values if name == "count" else [[[value]] for value in values] for name, values in stats.items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return value


class EpisodeWriter:
    """Writes one episode: a dataset frame per tick plus the journal; ``finish`` makes it final."""

    def __init__(self, config: DeploymentConfig, output_dir: Path, info: EpisodeInfo, *, vcodec: str = "h264",
                 image_writer_threads: int = 2) -> None:
        self.config = config
        self.output_dir = output_dir
        self.info = info
        self.root = output_dir / WORK_DIR / info.name
        self.root.parent.mkdir(parents=True, exist_ok=True)
        self.dataset = OneEpisodeDataset(config, self.root, vcodec, image_writer_threads)
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
        """Images queued for the PNG writer threads (the writer back-pressures on this)."""
        return self.dataset.pending_images()

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
        self.dataset.add_frame({key: frame[key] for key in self.dataset.camera_keys}, frame[STATE_KEY],
                               frame[ACTION_KEY])
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
            self.dataset.close()
            shutil.rmtree(self.root, ignore_errors=True)
            log.warning("%s: no frames recorded; nothing saved", self.info.name)
            return None
        started = time.monotonic()
        self.dataset.save(self.task)
        log.info("%s: %d frames encoded and finalised in %.1f s", self.info.name, self.frames,
                 time.monotonic() - started)
        return _complete(self.output_dir, self.root, self.info, label=self.label, stop_reason=self.stop_reason,
                         ended_t=self.ended_t, ended_wall=self.ended_wall, frames=self.frames,
                         tick_rows=self.tick_rows, chunk_rows=self.chunk_rows, hold_events=self.hold_events,
                         rejected=self.rejected, dropped_ticks=self.dropped_ticks, recovered=False)

    def abandon(self) -> None:
        """Close files without saving (shutdown with an episode still open keeps the journal for recovery)."""
        self.journal.close()
        self.dataset.close()


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
    dataset = OneEpisodeDataset(config, rebuild_root, start.get("vcodec", vcodec), image_writer_threads)
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
            dataset.add_frame(images, np.asarray(entry["state"], dtype=np.float32),
                              np.asarray(entry["action"], dtype=np.float32))
            entry["frame"] = len(tick_rows)
            tick_rows.append(entry)
        elif kind == "chunk":
            chunk_rows.append(entry)
        elif kind == "hold":
            hold_events[entry["reason"]] = hold_events.get(entry["reason"], 0) + 1
        elif kind == "stop":
            stop = entry
    if not tick_rows:
        dataset.close()
        shutil.rmtree(rebuild_root, ignore_errors=True)
        # Kept (renamed out of the way, never retried) so a person can look at what was left.
        kept = work_root.with_name(f"{work_root.name}.unrecoverable")
        work_root.rename(kept)
        log.warning("%s: none of %d journaled ticks has all its frames on disk; nothing to recover (left in %s)",
                    info.name, ticks_in_journal, kept)
        return None
    dataset.save(config.task)
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
