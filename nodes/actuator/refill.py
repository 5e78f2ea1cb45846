"""When the actuator asks for the next chunk (``RefillPlanner``): when the rows left cover the measured round trip
(a running p90 over a window of recent chunks), so the next chunk arrives before the queue runs dry; and the
one-time notice when no setting can cover it. Times are in the chunk queue's units (seconds; frames in lockstep).
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

import numpy as np

ROUND_TRIP_WINDOW = 20  # chunks in the running p90
ROUND_TRIP_QUANTILE = 90.0


@dataclass(frozen=True)
class CoverageNotice:
    """The round trip stopped (or started again) fitting inside a chunk: said once per change."""

    covered: bool
    round_trip_s: float  # p90, in the queue's time units (seconds; frames in lockstep)
    inference_s: float  # p90 of the policy's own reported total (seconds), -1 when unknown
    chunk_rows: int
    fps: float
    message: str


class RefillPlanner:
    """Asks for the next chunk when the rows left cover the measured round trip.

    The round trip is the time from sending a request to having its chunk, on the actuator's own clock
    (a running p90 over the last ``window`` chunks), so it includes the network, the policy's queue and
    its inference. A request sent with ``r`` rows left (after this tick's row) has rows for the next ``r``
    ticks; it must arrive before they run out, with ``margin_rows`` to spare (1 in real time: the reply
    lands between ticks; 0 in lockstep, where the request waits for its chunk). So the threshold is
    ``ceil(p90 / period) + margin_rows`` rows, at most ``chunk_rows - 1`` (asking at a full queue would
    ask every tick). ``override`` (``actuator.refill_rows``) replaces the measurement.
    ``overlap_rows`` (rtc: the soft rows) asks that much earlier, so a request carries queued rows beyond
    the frozen ones for the policy to continue.

    Before the first measurement the threshold is half a chunk.
    """

    def __init__(self, period: float, fps: float, *, override: int | None = None, margin_rows: int = 1,
                 window: int = ROUND_TRIP_WINDOW, overlap_rows: int = 0) -> None:
        if not period > 0:
            raise ValueError(f"period: expected a positive tick length, got {period}")
        if override is not None and override < 0:
            raise ValueError(f"refill_rows: expected a non-negative row count or None, got {override}")
        self.period = float(period)
        self.fps = float(fps)
        self.override = override
        self.margin_rows = margin_rows
        # rtc: ask this many rows earlier still, so the request has that many queued rows to continue softly.
        self.overlap_rows = overlap_rows
        self.round_trips: collections.deque[float] = collections.deque(maxlen=window)
        self.inference: collections.deque[float] = collections.deque(maxlen=window)
        self.chunk_rows = 0  # rows per chunk (the policy contract's chunk_length); 0 until known
        self.covered: bool | None = None  # whether the p90 fits in a chunk (None: not judged yet)
        self.override_clipped = False

    def set_chunk_rows(self, rows: int) -> None:
        self.chunk_rows = int(rows)

    def record(self, round_trip: float, inference_s: float | None = None) -> CoverageNotice | None:
        """Add one chunk's round trip (queue time units) and the policy's reported total (seconds).

        Returns a notice when the verdict "the round trip fits in a chunk" changes (and the first time it
        does not fit), so the caller logs and publishes it once instead of on every tick.
        """
        if math.isfinite(round_trip) and round_trip >= 0:
            self.round_trips.append(float(round_trip))
        if inference_s is not None and math.isfinite(inference_s) and inference_s >= 0:
            self.inference.append(float(inference_s))
        return self._judge()

    def round_trip(self) -> float | None:
        """The running p90 of the round trip, or None before the first chunk."""
        if not self.round_trips:
            return None
        return float(np.percentile(np.asarray(self.round_trips), ROUND_TRIP_QUANTILE))

    def inference_p90(self) -> float:
        return float(np.percentile(np.asarray(self.inference), ROUND_TRIP_QUANTILE)) if self.inference else -1.0

    def threshold(self) -> int:
        """Ask for the next chunk when this many rows (or fewer) are left after this tick's row."""
        top = max(self.chunk_rows - 1, 0) if self.chunk_rows else None
        if self.override is not None:
            rows = self.override
        else:
            measured = self.round_trip()
            if measured is None:
                rows = self.chunk_rows // 2
            else:
                rows = math.ceil(measured / self.period - 1e-9) + self.margin_rows + self.overlap_rows
        return min(rows, top) if top is not None else rows

    def override_problem(self) -> str:
        """A one-time complaint when ``refill_rows`` cannot be honoured with this chunk length."""
        if self.override is None or not self.chunk_rows or self.override < self.chunk_rows or self.override_clipped:
            return ""
        self.override_clipped = True
        return (f"actuator.refill_rows={self.override} is not below the policy's chunk of {self.chunk_rows} rows: "
                f"every tick would ask for a new chunk; using {self.chunk_rows - 1} (remove refill_rows to "
                "schedule from the measured round trip)")

    def delay_rows(self, observation_age: float = 0.0) -> int:
        """Rows of a chunk requested now (after this tick's row ran) that will not run from it: the frozen rtc
        prefix. The reply is taken at the first tick after it lands, ``ceil(p90 / period)`` ticks on (at least
        ``margin_rows``: the next tick), and the chunk's rows start ``observation_age`` before now."""
        measured = self.round_trip() or 0.0
        ticks = max(self.margin_rows, math.ceil(measured / self.period - 1e-9))
        return max(0, ticks + round(observation_age / self.period))

    def _judge(self) -> CoverageNotice | None:
        measured = self.round_trip()
        if measured is None or not self.chunk_rows:
            return None
        chunk_s = self.chunk_rows * self.period
        covered = measured < chunk_s
        if covered == self.covered or (self.covered is None and covered):
            self.covered = covered
            return None
        self.covered = covered
        unit = 1.0 / self.fps / self.period  # seconds per queue time unit
        inference = self.inference_p90()
        split = f", of which the policy's own inference p90 {inference * 1000:.0f} ms" if inference >= 0 else ""
        numbers = (f"chunk round trip p90 {measured * unit * 1000:.0f} ms{split}; a chunk of {self.chunk_rows} "
                   f"rows lasts {chunk_s * unit * 1000:.0f} ms at {self.fps:g} Hz")
        if covered:
            message = f"round trip fits inside a chunk again: {numbers}"
        else:
            message = (f"the round trip is longer than a chunk lasts, so no row of a chunk is still usable when "
                       f"it arrives and the arm holds between chunks: {numbers}. Use a faster policy device or "
                       "fewer diffusion steps (policy.num_inference_steps), a checkpoint with more rows per "
                       "chunk (n_action_steps), or serve the whole horizon (policy.rows: horizon)")
        return CoverageNotice(covered=covered, round_trip_s=measured * unit, inference_s=inference,
                              chunk_rows=self.chunk_rows, fps=self.fps, message=message)
