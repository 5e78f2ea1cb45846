"""What the actuator publishes on its events socket (docs/protocol.md section 4): one ``action`` message per tick,
and the events (``hold``, ``chunk``, ``episode_*``, ``latency``, ``loop_stats``, ...). Every message published is
also remembered by the backlog (``nodes.actuator.backlog``) for a recorder restarted mid-episode."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.wire.protocol import KIND_ACTION, KIND_EVENT, Message
from nodes.actuator.core import ControlCore, TickDecision
from nodes.actuator.episodes import EpisodeRecord
from nodes.actuator.inputs import InputBook
from nodes.actuator.latency import LatencyTracker

# Messages the events publisher queues per subscriber before dropping: a few seconds of ticks and events (~90 a
# second), so a recorder or a test tap whose process (or this one's I/O thread) is starved for a moment on a loaded
# machine loses nothing; 4 (the default) lost ticks while a restarted recorder started up.
EVENTS_HWM = 1024


@dataclass
class LoopStats:
    window: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=4096))
    last_report: float = 0.0

    def percentiles(self) -> tuple[float, float]:
        if not self.window:
            return 0.0, 0.0
        values = np.asarray(self.window)
        return float(np.percentile(values, 50)), float(np.percentile(values, 99))


class EventStream:
    """The actuator's events publisher (the backlog's remembering wrapper of it), and what each message says."""

    def __init__(self, publisher: Any, core: ControlCore, inputs: InputBook, dry_run: bool) -> None:
        self.publisher = publisher
        self.core = core
        self.inputs = inputs
        self.dry_run = dry_run

    def publish(self, msg: Message) -> None:
        self.publisher.publish(msg)

    def close(self) -> None:
        self.publisher.close()

    def event(self, event: str, arrays: dict[str, np.ndarray] | None = None, **meta: Any) -> None:
        self.publish(Message(kind=KIND_EVENT, meta={"event": event, **meta}, arrays=arrays or {}))

    def episode(self, event: str, record: EpisodeRecord, reason: str, **extra: Any) -> None:
        self.event(event, episode_index=record.index, episode_id=record.uid, label=record.label, reason=reason,
                   ticks=record.ticks, **extra)

    def action(self, decision: TickDecision, now: float, lateness: float, frame_index: int) -> None:
        """The tick's ``action`` message (``role: executed``): what was commanded, or held and why."""
        core = self.core
        meta = {"role": "executed", "names": core.names, "tick": core.ticks, "hold": decision.hold,
                "hold_reason": decision.reason if decision.hold else "",
                "episode_index": core.episodes.episode_index, "obs_t": decision.obs_t, "row_t": decision.row_t,
                "inputs": self.inputs.input_seqs(),
                "frame_index": frame_index,
                "queue_depth": len(core.queue), "lateness_s": lateness, "dry_run": self.dry_run}
        record = core.episodes.active
        if record is not None:
            # The recorder keys episodes by episode_id and counts the episode_tick numbers it never saw.
            meta.update(episode_id=record.uid, episode_tick=record.ticks)
            record.ticks += 1
        self.publish(Message(kind=KIND_ACTION, t=now, meta=meta, arrays={"action": decision.target}))

    def latency(self, written: list[tuple[str, int, float]], tracker: LatencyTracker) -> None:
        """A ``latency`` event for every executed goal whose write returned on every arm."""
        for arm, tick, written_t in written:
            meta = tracker.written(tick, arm, written_t)
            if meta is not None:
                self.publish(Message(kind=KIND_EVENT, meta=meta))
