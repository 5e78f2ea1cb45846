"""What a recorded episode is made of: the names of its files and directories, why ticks of it were not
recorded (``DROP_*``), the records the writer takes per tick, chunk and goal written, and the ``EpisodeOutcome``
a finished episode hands to metrics. Data only; ``nodes.recorder.writer`` writes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.wire.images import JpegImage

if TYPE_CHECKING:  # pandas is imported where a file is written: a restarted recorder is back sooner
    import pandas as pd

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
