"""The actuator's part of the latency chain (docs/protocol.md, section 8): stamps per executed goal.

``LatencyTracker`` keeps, per chunk (keyed by its observation time), the stamps from capture to the
reply's arrival in the control loop, and per executed tick the row it commanded. When every arm's bus
writer reports that tick's goal written, ``completed`` hands out the finished ``latency`` event meta.
Pure bookkeeping, no sockets: the actuator node feeds it and publishes what it returns.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from common.wire.latency import STAMPS, LatencyError, stages

MAX_CHUNKS = 32  # chains kept: far more than the chunks whose rows can still be queued
MAX_PENDING_TICKS = 256  # executed ticks waiting for their bus write (a write replaced by a newer goal never comes)


@dataclass
class _Chunk:
    stamps: dict[str, float]
    server: dict[str, float]
    executed_rows: int = 0


@dataclass
class _Tick:
    obs_t: float
    row: int
    first_row: bool
    episode_index: int
    executed_t: float
    arms_left: set[str]
    written_t: float = 0.0
    chunk: _Chunk = field(default_factory=lambda: _Chunk({}, {}))


class LatencyTracker:
    def __init__(self, fps: float, arms: list[str]) -> None:
        self.fps = fps
        self.arms = list(arms)
        self.chunks: collections.OrderedDict[float, _Chunk] = collections.OrderedDict()
        self.ticks: collections.OrderedDict[int, _Tick] = collections.OrderedDict()

    def chunk_queued(self, key: float, observation_stamps: dict[str, float], sent_t: float, replied_t: float,
                     scheduled_t: float, server: dict[str, Any]) -> None:
        """A chunk's rows were queued at ``scheduled_t``. ``key``: the chunk's ``obs_t`` in the queue's units
        (the frame index in lockstep); ``observation_stamps``: capture/published/received of its oldest part."""
        stamps = {**observation_stamps, "sent_t": sent_t, "replied_t": replied_t, "scheduled_t": scheduled_t}
        self.chunks[float(key)] = _Chunk(stamps, {k: float(v) for k, v in server.items()
                                                              if isinstance(v, (int, float))})
        while len(self.chunks) > MAX_CHUNKS:
            self.chunks.popitem(last=False)

    def executed(self, tick: int, obs_t: float, row_t: float, executed_t: float, episode_index: int) -> bool:
        """The tick ``tick`` commanded the row meant for ``row_t`` of the chunk from ``obs_t``; False when
        that chunk's chain is unknown (then the goal gets no latency event)."""
        chunk = self.chunks.get(float(obs_t))
        if chunk is None or not self.arms:
            return False
        chunk.executed_rows += 1
        # Row k is meant for obs_t + k / fps (obs_t + k in lockstep, where fps is 1).
        self.ticks[tick] = _Tick(obs_t=obs_t, row=round((row_t - obs_t) * self.fps), first_row=chunk.executed_rows == 1,
                                 episode_index=episode_index, executed_t=executed_t, arms_left=set(self.arms),
                                 chunk=chunk)
        while len(self.ticks) > MAX_PENDING_TICKS:
            self.ticks.popitem(last=False)
        return True

    def written(self, tick: int, arm: str, written_t: float) -> dict[str, Any] | None:
        """``arm``'s bus writer finished ``tick``'s goal at ``written_t``; the event meta once every arm has."""
        entry = self.ticks.get(tick)
        if entry is None:
            return None
        entry.arms_left.discard(arm)
        entry.written_t = max(entry.written_t, written_t)
        if entry.arms_left:
            return None
        del self.ticks[tick]
        stamps = {**entry.chunk.stamps, "executed_t": entry.executed_t, "written_t": entry.written_t}
        stamps = {key: float(stamps[key]) for key in STAMPS}
        server = dict(entry.chunk.server)
        try:
            durations = stages(stamps, server)
        except LatencyError:
            durations = {}  # a policy that reports no server_s (older node): the stamps still go out
        return {"event": "latency", "tick": tick, "episode_index": entry.episode_index, "row": entry.row,
                "first_row": entry.first_row, "obs_t": entry.obs_t, "stamps": stamps, "server": server,
                "stages": durations, "end_to_end_s": stamps["written_t"] - stamps["capture_t"]}
