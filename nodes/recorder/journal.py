"""The crash journal of an episode being recorded (``journal.jsonl`` in its work directory): start, every tick's
state/action/metadata, chunks, latency, holds, restarts (``segment``, ``suspend``) and stop, one JSON line each,
appended as the episode runs (``nodes.recorder.writer``). Read back, it says what a work directory holds after
the recorder died or was restarted (``replay_journal``): the episode's frames per video segment, cut to the
frames every camera's stream has on disk."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.config import DeploymentConfig
from nodes.recorder.lerobot_v3 import OneEpisodeDataset
from nodes.recorder.records import JOURNAL, EpisodeInfo
from nodes.recorder.video import readable_frames


def jsonable(value: Any) -> Any:
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
