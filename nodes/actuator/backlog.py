"""The actuator's bounded backlog of its small streams, for a recorder that restarted mid-episode.

A recorder killed or restarted while an episode runs misses the ticks of its downtime. It resumes the same
recording (``nodes.recorder``) and asks the actuator's control socket (op ``backlog``,
docs/protocol.md section 6) for what it missed: every executed tick of the last ``BACKLOG_S`` seconds
(its meta, the target commanded and the measured state it acted on) and the small events (``hold``,
``chunk`` without its rows, ``latency``, ``episode_*``, ``instruction``). Images are not kept: the gap
stays a gap in the recording's frames, kept in true time (a new part), its ticks in ``gap_ticks.parquet``.

The backlog sits on the actuator's event publisher (``Backlog.wrap``): every message published is
also remembered, in bounded deques (``BACKLOG_S`` at the task's fps, ``EVENTS_KEPT`` events), so the
control loop pays one append per message.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from common.wire.protocol import KIND_ACTION, KIND_EVENT, Message, ProtocolError

BACKLOG_S = 60.0  # seconds of executed ticks kept
EVENTS_KEPT = 8000  # small events kept (latency events come once per goal written: ~30 a second)
PAGE_TICKS = 200  # ticks per reply at most
PAGE_BYTES = 150_000  # entries per reply at most (packed): the reply's header stays under the protocol's 256 KiB
EVENTS = ("hold", "chunk", "latency", "episode_start", "episode_stop", "episode_label", "instruction")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        value) else None


def _values(array: Any) -> list[float | None]:
    """A vector as msgpack-safe floats (None where not finite: a hold before any position was known)."""
    return [float(v) if math.isfinite(v) else None for v in np.asarray(array, dtype=np.float64).reshape(-1)]


class Backlog:
    """Remembers what the actuator publishes; ``serve`` answers the control socket's ``backlog`` op."""

    def __init__(self, fps: float, measured: Callable[[], np.ndarray | None],
                 active_episode: Callable[[], str]) -> None:
        self.ticks: deque[dict[str, Any]] = deque(maxlen=max(1, int(BACKLOG_S * fps)))
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self.measured = measured
        self.active_episode = active_episode

    def wrap(self, publisher: Any) -> Any:
        """``publisher`` whose ``publish`` also remembers each message (the one hook in the actuator)."""
        backlog = self

        class Remembering:
            def __getattr__(self, name: str) -> Any:
                return getattr(publisher, name)

            def publish(self, msg: Message, **options: Any) -> Message:
                sent = publisher.publish(msg, **options)
                backlog.remember(sent)
                return sent

        return Remembering()

    def remember(self, msg: Message) -> None:
        meta = msg.meta
        if msg.kind == KIND_ACTION and meta.get("role") == "executed":
            if not meta.get("episode_id"):
                return  # idle ticks: no recording needs them
            measured = self.measured()
            self.ticks.append({
                "t": msg.t, "tick": meta.get("tick"), "episode_id": meta.get("episode_id"),
                "episode_index": meta.get("episode_index"), "episode_tick": meta.get("episode_tick"),
                "hold": bool(meta.get("hold")), "hold_reason": meta.get("hold_reason", ""),
                "queue_depth": meta.get("queue_depth"), "lateness_s": _number(meta.get("lateness_s")),
                "obs_t": _number(meta.get("obs_t")), "frame_index": meta.get("frame_index"),
                "action": _values(msg.arrays.get("action", [])),
                "state": _values(measured) if measured is not None else None})
        elif msg.kind == KIND_EVENT and meta.get("event") in EVENTS:
            self.events.append({**{k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, dict, list))
                                   or v is None}, "t": msg.t})

    def serve(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The ``backlog`` op: ticks of ``episode_id`` after ``after_tick`` (its episode_tick) and the events after
        ``after_t``, oldest first, a page at a time: at most ``max_ticks`` ticks and ``PAGE_BYTES`` of entries, so
        a reply always fits the protocol's header limit (``more``: ask again from ``next_after_tick`` /
        ``next_after_t``). ``max_ticks`` 0 asks only which episode runs."""
        episode_id = meta.get("episode_id", "")
        if not isinstance(episode_id, str):
            raise ProtocolError("meta.episode_id", "the episode's id (str)", type(episode_id).__name__)
        after_tick, after_t = meta.get("after_tick", -1), meta.get("after_t", -1e300)
        if not isinstance(after_tick, int) or isinstance(after_tick, bool):
            raise ProtocolError("meta.after_tick", "an episode_tick (int)", type(after_tick).__name__)
        if _number(after_t) is None:
            raise ProtocolError("meta.after_t", "a time on the robot's clock (a finite float)", repr(after_t))
        limit = meta.get("max_ticks", PAGE_TICKS)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= PAGE_TICKS:
            raise ProtocolError("meta.max_ticks", f"an int 0..{PAGE_TICKS}", repr(limit))
        held = [row["episode_tick"] for row in self.ticks if row["episode_id"] == episode_id]
        reply: dict[str, Any] = {"active_episode_id": self.active_episode(), "episode_id": episode_id, "ticks": [],
                                 "events": [], "more": False, "next_after_tick": after_tick,
                                 "next_after_t": float(after_t), "oldest_tick": min(held) if held else -1,
                                 "kept_s": BACKLOG_S}
        if limit == 0:
            return reply
        # Ticks and events in time order; the page ends at a tick count or a size, whichever comes first.
        entries = sorted([(row["t"], 0, row) for row in self.ticks if row["episode_id"] == episode_id
                          and isinstance(row["episode_tick"], int) and row["episode_tick"] > after_tick]
                         + [(event["t"], 1, event) for event in self.events if event["t"] > float(after_t)],
                         key=lambda entry: (entry[0], entry[1]))
        size = 0
        for t, kind, entry in entries:
            if kind == 0 and len(reply["ticks"]) >= limit:
                reply["more"] = True
                break
            size += len(msgpack.packb(entry, default=str))
            if size > PAGE_BYTES:
                reply["more"] = True
                break
            if kind == 0:
                reply["ticks"].append(entry)
                reply["next_after_tick"] = entry["episode_tick"]
            else:
                reply["events"].append(entry)
            reply["next_after_t"] = t
        return reply
