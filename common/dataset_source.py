"""Read a local LeRobot v3 dataset for replay: layout check, episode selection, frames and rows.

The v3 files are read directly, with the libraries LeRobot itself reads them with, so the player (a
robot-side node) never imports torch: ``meta/info.json`` (json), ``meta/episodes/*/*.parquet`` and the
``data/`` parquet files of the selected episodes (pyarrow, only the columns replay needs), and the
``videos/`` mp4 files (PyAV). Nothing is ever downloaded. Episode rows and video files are located as
``LeRobotDatasetMetadata`` locates them (``data/chunk_index``, ``videos/<key>/file_index``,
``from_timestamp`` of each episode, and the path templates of ``info.json``).

Video is decoded per episode and camera:

- ``video_backend: pyav`` (default): one PyAV stream decode per episode segment, frame by frame, the
  way LeRobot's pyav backend decodes but without re-opening and re-seeking the file for every frame.
  It costs ~1.5 ms of CPU per 480x640 AV1 frame, where LeRobot's per-timestamp
  ``decode_video_frames`` costs ~12 ms (see ``bench/decode_rate.py``), which is the difference
  between three cameras at 30 fps fitting on a 2-core machine or not.
- any other backend (``torchcodec``): LeRobot's ``decode_video_frames`` on batches of timestamps. This
  path imports LeRobot's dataset code and with it torch (torchcodec decodes into torch tensors).

Either way each decoded frame is matched to its parquet timestamp within ``player.tolerance_s``, as
LeRobot does, so a frame is never silently paired with the wrong row.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.config import ConfigError, DeploymentConfig
from common.layout import ACTION_KEY, IMAGE_KEY_PREFIX, STATE_KEY, Joints, Layout, differences, image_key

log = logging.getLogger(__name__)

# LeRobot v3 layout (lerobot.datasets.utils, LeRobot 0.6.1): info.json may override both path templates.
INFO_PATH = "meta/info.json"
EPISODES_DIR = "meta/episodes"
DEFAULT_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DEFAULT_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
ROW_COLUMNS = ("episode_index", "frame_index", "timestamp", STATE_KEY, ACTION_KEY)

DECODE_BATCH = 30  # frames per decode_video_frames call on the non-pyav path


class DatasetError(ConfigError):
    """A dataset that cannot be replayed with this config; ``differences`` lists every mismatch."""

    def __init__(self, field: str, message: str, differences: list[str] | None = None) -> None:
        self.differences = differences or []
        super().__init__(field, message)


@dataclass
class EpisodeData:
    """The parquet rows of one episode, as numpy arrays in config order."""

    episode_index: int
    frame_indices: np.ndarray  # (n,) int64, 0..n-1 in a well-formed dataset
    timestamps: np.ndarray  # (n,) float64, seconds from the episode start
    states: np.ndarray  # (n, state_dim) float32
    actions: np.ndarray  # (n, action_dim) float32
    task: str = ""

    @property
    def length(self) -> int:
        return len(self.timestamps)


def _feature_names(feature: dict[str, Any]) -> list[str] | None:
    """LeRobot stores names as a list, or (older datasets) as ``{"motors": [...]}``."""
    names = feature.get("names")
    if isinstance(names, dict):
        names = next((value for value in names.values() if isinstance(value, list)), None)
    return [str(name) for name in names] if isinstance(names, list) else None


def dataset_layout(features: dict[str, dict], fps: int) -> Layout:
    """The dataset as a layout: its image features (H, W, C), state and action features, and fps."""

    def joints(key: str) -> Joints | None:
        feature = features.get(key)
        return None if feature is None else Joints(tuple(feature.get("shape", [])), _feature_names(feature))

    return Layout(cameras={key.removeprefix(IMAGE_KEY_PREFIX): tuple(feature.get("shape", []))
                           for key, feature in features.items() if key.startswith(IMAGE_KEY_PREFIX)},
                  state=joints(STATE_KEY), action=joints(ACTION_KEY), fps=fps)


def layout_differences(features: dict[str, dict], fps: int, config: DeploymentConfig) -> list[str]:
    """Every way a dataset's features disagree with what the config's nodes publish; empty if none.

    Cameras the config does not use are ignored (a dataset may carry more views than a deployment).
    """
    problems: list[str] = []
    layout = dataset_layout(features, fps)
    keys = {"state": STATE_KEY, "action": ACTION_KEY}
    for difference in differences(layout, config):
        name, theirs, ours = difference.name, difference.theirs, difference.ours
        match difference.kind:
            case "missing_camera":
                problems.append(f"camera '{name}' is not in the dataset (dataset cameras: {sorted(layout.cameras)})")
            case "camera_shape":
                cam = config.cameras[name]
                problems.append(f"camera '{name}': dataset frames are {list(theirs)} (H, W, C), config "
                                f"cameras.{name} is [{cam.height}, {cam.width}, 3]")
            case "absent":
                problems.append(f"{name}: the dataset has no '{keys[name]}' feature")
            case "size":
                problems.append(f"{name}: dataset '{keys[name]}' has shape {list(theirs)}, config has {len(ours)} "
                                f"joints ({ours})")
            case "names":
                problems.append(f"{name} names differ: dataset {theirs}, config {ours}")
            case "fps":
                problems.append(f"fps: dataset recorded at {fps}, config runs at {config.fps}")
    for camera in config.cameras:
        feature = features.get(image_key(camera))
        if feature is not None and feature.get("dtype") != "video":
            problems.append(f"camera '{camera}' is stored as {feature.get('dtype')!r}; the player replays "
                            "'video' features (mp4)")
    return problems


class DatasetSource:
    """One opened dataset: its selected episodes' rows in memory and video decoders on demand."""

    def __init__(self, config: DeploymentConfig, *, dataset: str | os.PathLike[str] | None = None,
                 repo_id: str | None = None, episodes: list[int] | None = None,
                 video_backend: str | None = None) -> None:
        player = config.player
        self.config = config
        self.root = config.resolve(str(dataset if dataset is not None else player.dataset))
        self.repo_id = repo_id or player.repo_id  # kept for reports; a local dataset is read by its root
        self.video_backend = video_backend or player.video_backend
        self.tolerance_s = player.tolerance_s
        self.cameras = list(config.cameras)
        self._check_files_present()
        self.info = self._read_info()
        version = str(self.info.get("codebase_version", ""))
        if not version.startswith("v3"):
            raise DatasetError("player.dataset", f"{self.root} is a LeRobot {version or 'unknown-version'} "
                               "dataset; the player reads v3.0 (convert it with LeRobot's "
                               "convert_dataset_v21_to_v30)")
        self.features: dict[str, dict[str, Any]] = dict(self.info.get("features") or {})
        differences = layout_differences(self.features, int(self.info.get("fps", 0)), config)
        if differences:
            raise DatasetError("player.dataset", f"the dataset at {self.root} does not match the config: "
                               + "; ".join(differences), differences)
        self.fps = int(self.info["fps"])
        self.episode_meta = self._read_episode_meta()
        self.episodes = self._select_episodes(episodes if episodes is not None else list(player.episodes))
        self._check_videos_present()
        self._rows = self._load_rows()

    # ------------------------------------------------------------------ checks
    def _check_files_present(self) -> None:
        if not self.root.is_dir():
            raise DatasetError("player.dataset", f"no dataset directory at {self.root}; generate a demo with "
                               f"`python -m common.tools.demo_data --task {self.config.task} --output {self.root}` "
                               "or point player.dataset at a local LeRobot v3 dataset")
        for relative in ("meta/info.json", "meta/episodes", "data"):
            if not (self.root / relative).exists():
                raise DatasetError("player.dataset", f"{self.root} is not a LeRobot v3 dataset: "
                                   f"{relative} is missing")

    def _read_info(self) -> dict[str, Any]:
        path = self.root / INFO_PATH
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError("player.dataset", f"cannot read the LeRobot metadata of {self.root}: {path}: "
                               f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(info, dict):
            raise DatasetError("player.dataset", f"{path}: expected a JSON object, got {type(info).__name__}")
        return info

    def _read_episode_meta(self) -> dict[int, dict[str, Any]]:
        """``meta/episodes/*/*.parquet`` without the per-episode stats columns, by episode index."""
        paths = sorted((self.root / EPISODES_DIR).glob("*/*.parquet"))
        if not paths:
            raise DatasetError("player.dataset", f"{self.root} is not a LeRobot v3 dataset: no parquet file "
                               f"under {EPISODES_DIR}/")
        meta: dict[int, dict[str, Any]] = {}
        for path in paths:
            try:
                columns = [name for name in pq.read_schema(path).names if not name.startswith("stats/")]
                rows = pq.read_table(path, columns=columns).to_pylist()
            except (OSError, ValueError, pa.ArrowException) as exc:
                raise DatasetError("player.dataset", f"cannot read the LeRobot metadata of {self.root}: {path}: "
                                   f"{type(exc).__name__}: {exc}") from exc
            for row in rows:
                meta[int(row["episode_index"])] = row
        return meta

    def _select_episodes(self, wanted: list[int]) -> list[int]:
        total = int(self.info.get("total_episodes", len(self.episode_meta)))
        if total == 0:
            raise DatasetError("player.dataset", f"{self.root} has no episodes")
        if not wanted:
            wanted = list(range(total))
        bad = [index for index in wanted if not 0 <= int(index) < total]
        if bad:
            raise DatasetError("player.episodes", f"episodes {bad} do not exist; the dataset has episodes "
                               f"0..{total - 1}")
        unlisted = [int(index) for index in wanted if int(index) not in self.episode_meta]
        if unlisted:
            raise DatasetError("player.dataset", f"episodes {unlisted} are missing from {self.root / EPISODES_DIR} "
                               f"(info.json says {total} episodes)")
        return [int(index) for index in wanted]

    def _check_videos_present(self) -> None:
        for episode in self.episodes:
            for camera in self.cameras:
                path = self.video_path(episode, camera)
                if not path.is_file():
                    raise DatasetError("player.dataset", f"episode {episode}, camera '{camera}': video file "
                                       f"{path} is missing")

    # ------------------------------------------------------------------ rows
    def _read_data_rows(self) -> pa.Table:
        """The selected episodes' parquet rows (only the files that hold them, only the columns used)."""
        template = self.info.get("data_path") or DEFAULT_DATA_PATH
        files = sorted({template.format(chunk_index=int(self.episode_meta[episode]["data/chunk_index"]),
                                        file_index=int(self.episode_meta[episode]["data/file_index"]))
                        for episode in self.episodes})
        tables = []
        for relative in files:
            path = self.root / relative
            if not path.is_file():
                raise DatasetError("player.dataset", f"data file {path} is missing (episodes {self.episodes})")
            try:
                tables.append(pq.read_table(path, columns=list(ROW_COLUMNS),
                                            filters=[("episode_index", "in", self.episodes)]))
            except (OSError, ValueError, pa.ArrowException) as exc:
                raise DatasetError("player.dataset", f"cannot read the rows of {path} (columns {list(ROW_COLUMNS)}): "
                                   f"{type(exc).__name__}: {exc}") from exc
        return pa.concat_tables(tables)

    def _load_rows(self) -> dict[int, EpisodeData]:
        table = self._read_data_rows()

        def matrix(name: str) -> np.ndarray:
            column = table.column(name).combine_chunks()
            width = column.type.list_size
            return np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, width)

        episode_column = np.asarray(table.column("episode_index").to_numpy())
        frame_column = np.asarray(table.column("frame_index").to_numpy(), dtype=np.int64)
        time_column = np.asarray(table.column("timestamp").to_numpy(), dtype=np.float64)
        states, actions = matrix(STATE_KEY), matrix(ACTION_KEY)
        rows: dict[int, EpisodeData] = {}
        for episode in self.episodes:
            selected = np.flatnonzero(episode_column == episode)
            order = selected[np.argsort(frame_column[selected], kind="stable")]
            if len(order) == 0:
                raise DatasetError("player.dataset", f"episode {episode} has no rows in {self.root / 'data'}")
            tasks = self.episode_meta[episode].get("tasks") or [""]
            rows[episode] = EpisodeData(episode_index=episode, frame_indices=frame_column[order],
                                        timestamps=time_column[order], states=states[order],
                                        actions=actions[order], task=str(tasks[0]))
        return rows

    def episode(self, episode: int) -> EpisodeData:
        if episode not in self._rows:
            raise DatasetError("player.episodes", f"episode {episode} is not selected (selected: {self.episodes})")
        return self._rows[episode]

    # ------------------------------------------------------------------ video
    def video_path(self, episode: int, camera: str) -> Path:
        key = image_key(camera)
        entry = self.episode_meta[episode]
        template = self.info.get("video_path") or DEFAULT_VIDEO_PATH
        return self.root / template.format(video_key=key, chunk_index=int(entry[f"videos/{key}/chunk_index"]),
                                           file_index=int(entry[f"videos/{key}/file_index"]))

    def _video_start(self, episode: int, camera: str) -> float:
        return float(self.episode_meta[episode][f"videos/{image_key(camera)}/from_timestamp"])

    def camera_frames(self, episode: int, camera: str) -> Iterator[np.ndarray]:
        """The episode's frames of one camera in row order, uint8 HxWx3 RGB."""
        if self.video_backend == "pyav":
            return self._pyav_frames(episode, camera)
        return self._lerobot_frames(episode, camera)

    def _pyav_frames(self, episode: int, camera: str) -> Iterator[np.ndarray]:
        import av

        rows = self.episode(episode)
        path = self.video_path(episode, camera)
        targets = self._video_start(episode, camera) + rows.timestamps
        tolerance = self.tolerance_s
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            # Land on the keyframe at or before the first frame (1 tick of margin, as LeRobot does).
            container.seek(max(0, round(targets[0] / stream.time_base) - 1), backward=True, any_frame=False,
                           stream=stream)
            wanted = 0
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                frame_time = float(frame.pts * stream.time_base)
                if frame_time < targets[wanted] - tolerance:
                    continue  # before this episode (keyframe run-up) or a duplicate
                if frame_time > targets[wanted] + tolerance:
                    raise DatasetError("player.dataset", f"{path}: no frame at {targets[wanted]:.4f}s for "
                                       f"episode {episode} frame {wanted} (next frame is at {frame_time:.4f}s; "
                                       f"tolerance {tolerance}s)")
                yield frame.to_ndarray(format="rgb24")
                wanted += 1
                if wanted == len(targets):
                    return
        raise DatasetError("player.dataset", f"{path}: video ends after {wanted} of {len(targets)} frames of "
                           f"episode {episode} (camera '{camera}')")

    def _lerobot_frames(self, episode: int, camera: str) -> Iterator[np.ndarray]:
        from lerobot.datasets.video_utils import decode_video_frames

        rows = self.episode(episode)
        path = self.video_path(episode, camera)
        targets = (self._video_start(episode, camera) + rows.timestamps).tolist()
        for start in range(0, len(targets), DECODE_BATCH):
            try:
                batch = decode_video_frames(path, targets[start:start + DECODE_BATCH], self.tolerance_s,
                                            self.video_backend, return_uint8=True)
            except Exception as exc:
                raise DatasetError("player.video_backend", f"{path}: {self.video_backend} could not decode "
                                   f"episode {episode} frames {start}..: {type(exc).__name__}: {exc}") from exc
            # (N, C, H, W) -> N x (H, W, C)
            yield from batch.permute(0, 2, 3, 1).contiguous().numpy()


_END = object()


class EpisodeReader:
    """Decodes one episode ahead of playback: a thread per camera feeding a bounded queue.

    Video decoding releases the GIL, so the cameras decode in parallel with each other and with the
    publishing loop. ``next()`` returns ``{camera: image}`` for the next row, or None at the end.
    """

    def __init__(self, source: DatasetSource, episode: int, prefetch: int = 30) -> None:
        self.source = source
        self.episode = episode
        self._stop = threading.Event()
        self._queues: dict[str, queue.Queue[Any]] = {camera: queue.Queue(maxsize=max(1, prefetch))
                                                     for camera in source.cameras}
        self._threads = [threading.Thread(target=self._decode, args=(camera,), daemon=True,
                                          name=f"decode-{camera}") for camera in source.cameras]
        for thread in self._threads:
            thread.start()

    def _put(self, camera: str, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queues[camera].put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _decode(self, camera: str) -> None:
        try:
            for image in self.source.camera_frames(self.episode, camera):
                if not self._put(camera, image):
                    return
            self._put(camera, _END)
        except Exception as exc:  # handed to the consumer, which logs it and skips the episode
            self._put(camera, exc)

    def next(self, timeout_s: float = 30.0) -> dict[str, np.ndarray] | None:
        frames: dict[str, np.ndarray] = {}
        for camera, items in self._queues.items():
            try:
                item = items.get(timeout=timeout_s)
            except queue.Empty as exc:
                raise DatasetError("player.dataset", f"camera '{camera}' decoder produced nothing in "
                                   f"{timeout_s}s (episode {self.episode})") from exc
            if isinstance(item, Exception):
                raise item
            if item is _END:
                return None
            frames[camera] = item
        return frames

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2.0)
