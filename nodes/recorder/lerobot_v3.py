"""The LeRobot v3 files of one recorded episode (``OneEpisodeDataset``), written with pyarrow and PyAV in
LeRobot 0.6.1's layout and statistics, without LeRobot's dataset classes (they import torch)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from common.config import DeploymentConfig
from common.layout import dataset_features
from common.wire.contract import ACTION_KEY, STATE_KEY, image_key
from common.wire.images import JpegImage
from nodes.recorder.video import (
    VIDEO_ENCODER_ALIASES,
    CameraVideo,
    PixelHistogram,
    VideoResult,
    remux,
)

log = logging.getLogger(__name__)

# LeRobot 0.6.1's v3 layout (lerobot.datasets.utils) and statistics (lerobot.datasets.compute_stats).
V3_CODEBASE_VERSION = "v3.0"
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
STATS_QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
# Each camera's fragmented MP4 while the episode is open (nodes.recorder.video).
STREAM_DIR = "stream"


class OneEpisodeDataset:
    """The LeRobot v3 files of one episode, written without LeRobot's dataset classes.

    LeRobot's ``LeRobotDataset`` imports torch (and Hugging Face ``datasets``), which a robot-side node
    must not load; the files themselves are plain parquet, json and mp4, written here with the libraries
    LeRobot writes them with (pyarrow/pandas, PyAV) in LeRobot 0.6.1's layout:
    ``meta/info.json``, ``meta/stats.json``, ``meta/tasks.parquet``,
    ``meta/episodes/chunk-000/file-000.parquet``, ``data/chunk-000/file-000.parquet`` and
    ``videos/<camera key>/chunk-000/file-000.mp4``. ``LeRobotDataset(root=...)`` reads the result
    (tests/test_recorder.py does). Each camera's video is encoded while the episode runs
    (``nodes.recorder.video.CameraVideo``) into ``stream/<camera key>.mp4``, a fragmented MP4 that a
    crash leaves readable for ``recover_episode``; ``save`` copies it into LeRobot's plain MP4.
    """

    def __init__(self, config: DeploymentConfig, root: Path, vcodec: str, video_preset: str = "ultrafast", *,
                 encode: bool = True, segment: int = 0) -> None:
        self.root = root
        self.fps = int(config.fps)
        self.features = dataset_features(config)
        self.camera_keys = [image_key(name) for name in config.cameras]
        self.robot_type = "bi_so101_follower" if len(config.arms) > 1 else "so101_follower"
        self.vcodec = vcodec
        self.video_backend = config.player.video_backend
        self.root.mkdir(parents=True, exist_ok=True)
        self.states: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.videos: dict[str, CameraVideo] = {}
        self.segment = segment  # which of the recording's video segments the encoders write (a restart adds one)
        if encode:
            for key in self.camera_keys:
                height, width = self.features[key]["shape"][:2]
                # About a second of frames waits per camera at most (the writer blocks on it).
                self.videos[key] = CameraVideo(key, self.stream_path(key, segment), width=width, height=height,
                                               fps=self.fps, vcodec=vcodec, preset=video_preset, max_pending=self.fps)

    @property
    def frames(self) -> int:
        return len(self.states)

    def stream_path(self, key: str, segment: int = 0) -> Path:
        """A camera's video as encoded while recording: segment 0, then one more per recorder restart that
        resumed the recording (``nodes.recorder.writer``), each its own fragmented MP4."""
        return self.root / STREAM_DIR / (f"{key}.mp4" if segment == 0 else f"{key}.seg{segment}.mp4")

    def add_frame(self, images: dict[str, np.ndarray | JpegImage], state: np.ndarray, action: np.ndarray) -> None:
        """Hand the frame's images to the camera encoders (the arrays must not change afterwards; blocks
        while a camera's encoder is a second behind) and keep its state and action."""
        for key in self.camera_keys:
            self.videos[key].put(images[key])
        self.states.append(np.asarray(state, dtype=np.float32))
        self.actions.append(np.asarray(action, dtype=np.float32))

    def pending_images(self) -> int:
        return sum(video.pending() for video in self.videos.values())

    def close(self, *, discard: bool = False) -> dict[str, VideoResult]:
        """Encode what is queued (``discard``: drop it) and close every camera's stream (it stays in the work
        directory)."""
        results: dict[str, VideoResult] = {}
        errors: list[str] = []
        for key, video in self.videos.items():
            try:
                results[key] = video.close(discard=discard)
            except RuntimeError as exc:
                errors.append(str(exc))
        self.videos = {}
        if errors:
            raise RuntimeError("; ".join(errors))
        return results

    def save(self, task: str, videos: dict[str, VideoResult] | None = None,
             parts: list[dict[str, Any]] | None = None, segments: list[int] | None = None) -> None:
        """Write the videos, parquet and json files of the finished episode.

        ``videos``: the camera streams already closed (recovery passes what it read back); by default the
        encoders of this episode are closed here. ``parts``: where the recording was cut at gaps in time
        (``nodes.recorder.parts.split_parts``): each part becomes one LeRobot episode of this dataset whose
        timestamps run at ``fps`` from 0, so no part compresses time; by default the whole is one part.
        ``segments``: frames per video segment (``stream_path``), in order; each becomes its own LeRobot video
        file (``file_index``), and no part may span two of them. By default one segment."""
        import pandas as pd  # here, not at import: a (re)started recorder is recording sooner
        import pyarrow as pa
        import pyarrow.parquet as pq

        if videos is None:
            videos = self.close()
        count = self.frames
        if count == 0:
            raise ValueError("an episode without frames cannot be saved")
        segments = segments or [count]
        if sum(segments) != count:
            raise ValueError(f"the video segments hold {sum(segments)} frames, the episode {count}")
        video_info: dict[str, dict[str, Any]] = {}
        for key in self.camera_keys:
            for segment, frames in enumerate(segments):
                if frames == 0:  # a segment a restart left without a complete frame: no file, no part in it
                    continue
                target = self.root / V3_VIDEO_PATH.format(video_key=key, chunk_index=0, file_index=segment)
                copied, codec = remux(self.stream_path(key, segment), target, frames)
                if copied != frames:
                    raise RuntimeError(f"{key}: video segment {segment} has {copied} frames, the episode {frames} "
                                       "there")
                video_info.setdefault(key, self._video_info(key, codec))
        segment_starts = np.cumsum([0, *segments])
        states, actions = np.stack(self.states), np.stack(self.actions)
        if not parts:
            parts = [{"part": 0, "from_frame": 0, "frames": count, "start_s": 0.0}]
        if sum(int(part["frames"]) for part in parts) != count:
            raise ValueError(f"the parts cover {sum(int(p['frames']) for p in parts)} frames, the episode {count}")
        part_of = np.concatenate([np.full(int(part["frames"]), index, dtype=np.int64)
                                  for index, part in enumerate(parts)])
        starts = np.array([int(part["from_frame"]) for part in parts], dtype=np.int64)
        frame_index = np.arange(count, dtype=np.int64) - starts[part_of]
        columns: dict[str, np.ndarray] = {
            STATE_KEY: states, ACTION_KEY: actions,
            "timestamp": (frame_index / self.fps).astype(np.float32), "frame_index": frame_index,
            "episode_index": part_of, "index": np.arange(count, dtype=np.int64),
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
            stats[key] = _image_stats(videos[key].histogram)
        episodes: list[dict[str, Any]] = []
        for index, part in enumerate(parts):
            first, length = int(part["from_frame"]), int(part["frames"])
            episode: dict[str, Any] = {
                "episode_index": index, "tasks": [task], "length": length,
                "data/chunk_index": 0, "data/file_index": 0, "dataset_from_index": first,
                "dataset_to_index": first + length,
            }
            # Each part lies in one video segment (file): its stretch of that file's frames.
            segment = int(np.searchsorted(segment_starts, first, side="right") - 1)
            if first + length > segment_starts[segment + 1]:
                raise ValueError(f"part {index} (frames {first}..{first + length - 1}) spans two video segments")
            offset = first - int(segment_starts[segment])
            for key in self.camera_keys:
                episode.update({f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": segment,
                                f"videos/{key}/from_timestamp": offset / self.fps,
                                f"videos/{key}/to_timestamp": (offset + length) / self.fps})
            rows = slice(first, first + length)
            part_stats = stats if len(parts) == 1 else {
                name: _feature_stats(values[rows] if values.ndim == 2 else values[rows].reshape(-1, 1))
                for name, values in columns.items()} | {key: stats[key] for key in self.camera_keys}
            for name, feature_stats in part_stats.items():
                episode.update({f"stats/{name}/{stat}": value for stat, value in feature_stats.items()})
            episode.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
            episodes.append(episode)
        episodes_path = self.root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
        episodes_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(episodes), episodes_path)
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
            "total_episodes": len(parts), "total_frames": count, "total_tasks": 1, "chunks_size": 1000,
            "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
            "data_path": V3_DATA_PATH, "video_path": V3_VIDEO_PATH, "robot_type": self.robot_type,
            "splits": {"train": f"0:{len(parts)}"},
            # armpipe's own key (LeRobot ignores it): one entry per LeRobot episode of this recording, with
            # where it starts in true time; more than one means the recording was cut at a gap in time.
            "armpipe_parts": parts,
        }
        (self.root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
        shutil.rmtree(self.root / STREAM_DIR, ignore_errors=True)

    def _video_info(self, key: str, codec: str) -> dict[str, Any]:
        """The feature's ``info`` block, as LeRobot writes it for its encoder settings."""
        height, width = self.features[key]["shape"][:2]
        encoder = VIDEO_ENCODER_ALIASES.get(self.vcodec, self.vcodec)
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


def _image_stats(histogram: PixelHistogram) -> dict[str, list]:
    """Per-channel statistics in [0, 1] with LeRobot's (3, 1, 1) shape, from the pixel histogram of the
    episode's frames strided to ~150 px (``video.stats_sample``, as LeRobot downsamples). Exactly what
    ``_feature_stats`` gives on those pixels (quantiles with numpy's linear interpolation), from 256 counts
    instead of sorting millions of float pixels (seconds per episode on a small CPU)."""
    values = np.arange(256, dtype=np.float64) / 255.0
    stats: dict[str, list] = {name: [] for name in ("min", "max", "mean", "std",
                                                     *(f"q{round(q * 100):02d}" for q in STATS_QUANTILES))}
    total = int(histogram.counts[0].sum())
    for counts in histogram.counts:
        present = np.flatnonzero(counts)
        mean = float((counts * values).sum() / total)
        stats["min"].append(float(values[present[0]]))
        stats["max"].append(float(values[present[-1]]))
        stats["mean"].append(mean)
        stats["std"].append(float(np.sqrt((counts * (values - mean) ** 2).sum() / total)))
        cumulative = np.cumsum(counts)
        for quantile in STATS_QUANTILES:
            position = (total - 1) * quantile  # numpy's "linear" method on the sorted pixels
            below = int(np.floor(position))
            low = values[np.searchsorted(cumulative, below, side="right")]
            high = values[np.searchsorted(cumulative, min(below + 1, total - 1), side="right")]
            stats[f"q{round(quantile * 100):02d}"].append(float(low + (position - below) * (high - low)))
    result: dict[str, list] = {name: [[[value]] for value in column] for name, column in stats.items()}
    result["count"] = [total]  # pixels counted, as LeRobot counts them
    return result
