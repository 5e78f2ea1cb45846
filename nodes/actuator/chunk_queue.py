"""Timestamped action rows: when each row of a policy chunk is meant to run, and what to do on overlap.

Row ``k`` of a chunk predicted from an observation taken at ``obs_t`` is meant for ``obs_t + k * period``
(``period = 1 / fps``). The queue holds rows keyed by that time. A control tick at time ``now`` owns the
half-open slot ``[now - period/2, now + period/2)``:

- rows before the slot have passed and are discarded (never executed late, never replayed);
- the row inside the slot is the one executed this tick, and it leaves the queue when popped;
- rows after the slot wait for their tick.

The same arithmetic serves lockstep evaluation with ``period = 1`` and times measured in frame indices:
row ``j`` of a chunk from frame ``i`` runs at frame ``i + j``.

A new chunk whose rows overlap rows still queued is merged by a named rule (``OVERLAP_RULES``):

- ``replace``: the new chunk wins; every queued row is dropped.
- ``blend``: each new row that falls in the slot of a queued row becomes
  ``blend_old_weight * old + (1 - blend_old_weight) * new``; the new chunk then replaces the queue.

- ``rtc`` (real-time chunking): merged like ``replace``, but the request that produced the chunk carried
  the rows that would still run while it was computed (``prefix``), and the policy continued them, so the
  new chunk starts where the old one was (see docs/nodes/policy.md).

In every rule queued rows beyond the new chunk's last row are dropped too: they come from an older
prediction than the one just received.

When to ask for the next chunk is ``nodes.actuator.refill``.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

OVERLAP_RULES = ("replace", "blend", "rtc")
EXECUTED_HISTORY = 64  # executed rows kept for the rtc prefix (rows of the current chunk that already ran)


@dataclass(frozen=True)
class InsertResult:
    """What happened to one chunk on arrival."""

    rows: int  # rows received
    accepted: int  # rows queued
    dropped_stale: int  # rows whose slot had already passed on arrival
    blended: int  # accepted rows mixed with a queued row (blend rule)
    replaced: int  # queued rows discarded by this chunk


class ChunkQueue:
    """Action rows keyed by the time they are meant for; one row leaves per tick at most."""

    def __init__(self, period: float, overlap: str = "blend", blend_old_weight: float = 0.5,
                 action_dim: int | None = None) -> None:
        if not period > 0:
            raise ValueError(f"period: expected a positive tick length, got {period}")
        if overlap not in OVERLAP_RULES:
            raise ValueError(f"overlap: expected one of {list(OVERLAP_RULES)}, got {overlap!r}")
        if not 0.0 <= blend_old_weight <= 1.0:
            raise ValueError(f"blend_old_weight: expected a weight in 0..1, got {blend_old_weight}")
        self.period = float(period)
        self.overlap = overlap
        self.blend_old_weight = float(blend_old_weight)
        self.action_dim = action_dim
        self._times = np.zeros(0, dtype=np.float64)
        self._rows = np.zeros((0, action_dim or 0), dtype=np.float32)
        self._obs_t = np.zeros(0, dtype=np.float64)  # observation time of each row's chunk
        # (row_t, row) of the rows popped lately: what already ran, for the rtc prefix.
        self._executed: collections.deque[tuple[float, np.ndarray]] = collections.deque(maxlen=EXECUTED_HISTORY)
        # rtc: the newest chunk's guidance rows (predicted after its last row, never executed), for the prefix.
        self._guide_times = np.zeros(0, dtype=np.float64)
        self._guide_rows = np.zeros((0, action_dim or 0), dtype=np.float32)
        self.expired = 0  # rows that were never executed because their slot passed
        # How much earlier than its slot the next row may run (seconds; 0: never). The real-time loop's ticks move
        # their phase by up to a quarter period (nodes/actuator/pacer.py); a tick moved early then takes the next
        # row instead of holding for a row meant a moment later. Rows whose slot passed are dropped all the same.
        self.lookahead = 0.0

    # ------------------------------------------------------------------ arrival
    def insert(self, chunk: np.ndarray, obs_t: float, now: float, guide: np.ndarray | None = None) -> InsertResult:
        """Queue ``chunk`` (n, action_dim) predicted from the observation at ``obs_t``, arriving at ``now``.

        ``guide`` (g, action_dim): the rows the policy predicted after the chunk's last row (meant for
        ``obs_t + (n + j) * period``). They never run; they only extend ``prefix`` (rtc), and the next
        chunk's guide (or its lack) replaces them."""
        chunk = np.asarray(chunk)
        if chunk.ndim != 2 or chunk.shape[0] == 0:
            raise ValueError(f"chunk: expected a (rows, action_dim) array with at least one row, got shape "
                             f"{chunk.shape}")
        if self.action_dim is not None and chunk.shape[1] != self.action_dim:
            raise ValueError(f"chunk: expected {self.action_dim} values per row, got {chunk.shape[1]}")
        if not np.isfinite(obs_t):
            raise ValueError(f"obs_t: expected a finite observation time, got {obs_t}")
        times = obs_t + np.arange(chunk.shape[0], dtype=np.float64) * self.period
        keep = times >= self._slot_start(now)
        dropped_stale = int(np.count_nonzero(~keep))
        new_times = times[keep]
        new_rows = chunk[keep].astype(np.float32, copy=True)
        # Rows already queued whose slot is over are gone either way (this also keeps them out of blends).
        self._expire(now)
        blended = 0
        if self.overlap == "blend" and len(self._times) and len(new_times):
            # For each new row, the queued row meant for the same slot (nearest time within half a period).
            index = np.searchsorted(self._times, new_times)
            best = np.full(len(new_times), -1, dtype=np.int64)
            best_gap = np.full(len(new_times), np.inf)
            for candidate in (index - 1, index):
                valid = (candidate >= 0) & (candidate < len(self._times))
                gap = np.full(len(new_times), np.inf)
                gap[valid] = np.abs(self._times[candidate[valid]] - new_times[valid])
                better = valid & (gap < best_gap)
                best[better] = candidate[better]
                best_gap[better] = gap[better]
            overlapping = (best >= 0) & (best_gap < self.period / 2)
            if overlapping.any():
                weight = np.float32(self.blend_old_weight)
                old = self._rows[best[overlapping]]
                # inf/NaN rows stay non-finite (the safety filter refuses them at their tick); no warning.
                with np.errstate(invalid="ignore", over="ignore"):
                    new_rows[overlapping] = weight * old + (np.float32(1.0) - weight) * new_rows[overlapping]
                blended = int(np.count_nonzero(overlapping))
        if guide is not None and len(guide) and (np.ndim(guide) != 2 or np.shape(guide)[1] != chunk.shape[1]):
            raise ValueError(f"guide: expected (rows, {chunk.shape[1]}) rows after the chunk, got shape "
                             f"{np.shape(guide)}")
        if guide is not None and len(guide):
            self._guide_times = obs_t + (chunk.shape[0] + np.arange(len(guide), dtype=np.float64)) * self.period
            self._guide_rows = np.asarray(guide, dtype=np.float32).copy()
        else:
            self._guide_times = self._guide_times[:0]
            self._guide_rows = np.zeros((0, chunk.shape[1]), dtype=np.float32)
        replaced = len(self._times)
        self._times = new_times
        self._rows = new_rows
        self._obs_t = np.full(len(new_times), float(obs_t))
        return InsertResult(rows=int(chunk.shape[0]), accepted=len(new_times), dropped_stale=dropped_stale,
                            blended=blended, replaced=replaced)

    # ------------------------------------------------------------------ execution
    def pop(self, now: float) -> tuple[np.ndarray, float, float] | None:
        """The row meant for the tick at ``now`` as (row, row_t, obs_t), removed from the queue.

        Rows whose slot is before ``now``'s are discarded first. ``None`` when no row is meant for this
        tick (the queue is empty, or its next row is for a later tick).
        """
        self._expire(now)
        if not len(self._times) or self._times[0] >= self._slot_end(now) + self.lookahead:
            return None
        row, row_t, obs_t = self._rows[0].copy(), float(self._times[0]), float(self._obs_t[0])
        self._times, self._rows, self._obs_t = self._times[1:], self._rows[1:], self._obs_t[1:]
        self._executed.append((row_t, row))
        return row, row_t, obs_t

    def prefix(self, obs_t: float, max_rows: int) -> np.ndarray:
        """The rows meant for ``obs_t + k * period``, k = 0, 1, ... (at most ``max_rows``), as far as they are
        known without a gap: rows that already ran (popped lately), then rows still queued, then the newest
        chunk's guidance rows (``insert``'s ``guide``).

        This is what a chunk requested from the observation at ``obs_t`` should start with under ``rtc``:
        the actions that ran, or will run, while it is being computed. A slot is matched to a row meant
        for a time within half a period of it; the prefix stops at the first slot without one.
        """
        dim = self._rows.shape[1]
        if max_rows <= 0:
            return np.zeros((0, dim), dtype=np.float32)
        times = np.concatenate([np.asarray([t for t, _ in self._executed], dtype=np.float64), self._times,
                                self._guide_times])
        if not len(times):
            return np.zeros((0, dim), dtype=np.float32)
        rows = np.concatenate([np.asarray([r for _, r in self._executed], dtype=np.float32).reshape(-1, dim),
                               self._rows, self._guide_rows.reshape(-1, dim)])
        order = np.argsort(times, kind="stable")  # a new chunk's row may share the slot of one that just ran
        times, rows = times[order], rows[order]
        slots = obs_t + np.arange(max_rows, dtype=np.float64) * self.period
        index = np.clip(np.searchsorted(times, slots), 0, len(times) - 1)
        previous = np.clip(index - 1, 0, len(times) - 1)
        nearest = np.where(np.abs(times[previous] - slots) < np.abs(times[index] - slots), previous, index)
        matched = np.abs(times[nearest] - slots) < self.period / 2
        count = int(np.argmin(matched)) if not matched.all() else max_rows
        return rows[nearest[:count]].copy()

    def depth(self, now: float | None = None) -> int:
        """Rows still to run (those meant for ``now``'s tick or later when ``now`` is given)."""
        if now is None:
            return len(self._times)
        return int(np.count_nonzero(self._times >= self._slot_start(now)))

    def clear(self) -> int:
        """Drop every queued row (episode boundaries, stop); returns how many were dropped."""
        dropped = len(self._times)
        self._times = self._times[:0]
        self._rows = self._rows[:0]
        self._obs_t = self._obs_t[:0]
        self._executed.clear()
        self._guide_times = self._guide_times[:0]
        self._guide_rows = self._guide_rows[:0]
        return dropped

    def __len__(self) -> int:
        return len(self._times)

    # ------------------------------------------------------------------ slots
    def _slot_start(self, now: float) -> float:
        return now - self.period / 2

    def _slot_end(self, now: float) -> float:
        return now + self.period / 2

    def _expire(self, now: float) -> None:
        passed = int(np.searchsorted(self._times, self._slot_start(now), side="left"))
        if passed:
            self.expired += passed
            self._times, self._rows, self._obs_t = self._times[passed:], self._rows[passed:], self._obs_t[passed:]
