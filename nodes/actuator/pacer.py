"""When the real-time loop ticks: one tick per period, its phase locked to the data (issue 23).

The servo gets one goal per period at the task's fps, but a free-running clock would make every chunk wait
for the next tick after it lands (on average half a period, up to a whole one). ``PhaseLockedPacer`` instead
steers the ticks so that the tick executing a new chunk's first usable row comes right after the reply
lands (``arrived``): each reply sets the phase the ticks should fall on (its arrival plus ``LEAD_S``), and
each tick moves towards that phase by at most ``MAX_SHIFT`` of a period. Since the requests leave when a
frame arrives, the replies arrive at the frames' phase plus the round trip, so the ticks follow the
cameras' clock and the measured round trip, drifting with them; where the replies' phase slips later from
one reply to the next (a camera slower than the ticks), the target leads by the measured slip.

The phase moves smoothly: two consecutive deadlines are never less than ``MIN_GAP`` (3/4) of a period
apart, nor more than 5/4 of one (unless the loop itself fell behind: whole ticks missed are skipped, never
burst). The lower bound holds on the ticks' actual start times too: a tick that started late (a loaded
machine) pushes the next deadline to at least ``MIN_GAP`` after that start, so the servo never gets two goals
closer than that. Pure arithmetic on the monotonic clock, no sockets; lockstep does not use it.
"""

from __future__ import annotations

import math

MAX_SHIFT = 0.25  # the most a deadline moves from one period after the last, as a fraction of a period
MIN_GAP = 1.0 - MAX_SHIFT  # so no two ticks are closer than this fraction of a period
LEAD_S = 0.002  # a tick this long after the reply's arrival: room for the reply's handling and its jitter
SLIP_GAIN = 0.3  # how fast the expected phase slip between two replies follows the measured one


class PhaseLockedPacer:
    """Deadlines one period apart, steered towards the phase of the replies' arrivals."""

    def __init__(self, period: float, *, lead_s: float = LEAD_S, max_shift: float = MAX_SHIFT) -> None:
        self.period = period
        self.lead_s = min(lead_s, period / 4)
        self.max_shift_s = max_shift * period
        self.deadline = 0.0  # the next tick's time
        self.nominal = 0.0  # one period after the last tick's deadline (plus whole ticks skipped)
        self.target: float | None = None  # a time (mod period) the ticks should fall on; None before any reply
        self.last_arrival: float | None = None
        self.slip = 0.0  # how far (seconds, mod period) each reply's phase moved from the last one's, smoothed
        self.last_started = -math.inf  # when the last tick actually started (it may start after its deadline)

    def start(self, now: float) -> None:
        self.deadline = self.nominal = now

    def advance(self, now: float, started: float | None = None) -> int:
        """The tick at ``deadline`` started at ``started`` (default: on time) and ``now`` it is done: plan the next
        one. Returns the whole ticks that were missed (skipped, not run late in a burst)."""
        self.last_started = self.deadline if started is None else max(started, self.deadline)
        self.nominal = self.deadline + self.period
        skipped = 0
        behind = now - self.nominal
        if behind > self.period:
            skipped = int(behind // self.period)
            self.nominal += skipped * self.period
        self.deadline = self._steered()
        return skipped

    def arrived(self, t: float) -> None:
        """A reply landed at ``t``: the ticks should fall just after ``t`` (mod period). The pending tick moves to
        the earliest time after ``t`` the bounds allow (never sooner than ``MIN_GAP`` after the last tick)."""
        if self.last_arrival is not None:
            # A camera whose clock drifts against the ticks moves the replies' phase by about as much each time:
            # aim at where the next one will land, not where this one did.
            moved = (t - self.last_arrival + self.period / 2) % self.period - self.period / 2
            self.slip += SLIP_GAIN * (max(-self.max_shift_s, min(self.max_shift_s, moved)) - self.slip)
        self.last_arrival = t
        self.target = t + self.lead_s + max(0.0, self.slip)
        last = self.nominal - self.period
        self.deadline = self._spaced(min(max(self.target, last + self.period - self.max_shift_s),
                                         last + self.period + self.max_shift_s))

    def phase_error(self) -> float:
        """How far (seconds, wrapped) the next deadline still is from the locked phase (0 before any reply)."""
        if self.target is None:
            return 0.0
        return (self.target - self.deadline + self.period / 2) % self.period - self.period / 2

    def _spaced(self, deadline: float) -> float:
        """``deadline``, or later where the last tick started late: never sooner than ``MIN_GAP`` after it."""
        return max(deadline, self.last_started + self.period - self.max_shift_s)

    def _steered(self) -> float:
        if self.target is None or not math.isfinite(self.target):
            return self._spaced(self.nominal)
        # Towards the target phase: later only when the tick would come just before it (by up to MAX_SHIFT of a
        # period), earlier otherwise, so a tick never waits a whole period after the reply it follows.
        error = (self.target - self.nominal + self.period - self.max_shift_s) % self.period - (
            self.period - self.max_shift_s)
        return self._spaced(self.nominal + max(-self.max_shift_s, min(self.max_shift_s, error)))
