"""When the real-time loop ticks: one tick per period, its phase locked to the data (issue 23).

The servo gets one goal per period at the task's fps, but a free-running clock would make every chunk wait
for the next tick after it lands (on average half a period, up to a whole one). ``PhaseLockedPacer`` instead
steers the ticks so that the tick executing a new chunk's first usable row comes right after the reply
lands (``arrived``: the pending tick moves to just after it, ``LEAD_S``, as far as the bounds allow), and the
ticks after it steer to the phase the next reply is expected at: this one's, plus the measured slip from one
reply to the next (a camera slower than the ticks moves the replies' phase later each time), at most
``MAX_SHIFT`` of a period per tick. The correction is taken the shorter way round (half a period either side)
when the reply lands, and kept signed until the ticks have made it, never wrapped again: so a correction later
is made later even after the pending tick was pulled early for the reply, and the steering has no rate bias.
(It had: a reply landing just after its tick pulled the next one early and the phase then rotated on round the
other way, a tick added each time: 31.6 ticks per second against an exact 30 fps camera with 6 ms of reply
jitter, so a recording drifted off true time.) Since the requests leave when a frame arrives, the replies
arrive at the frames' phase plus the round trip, so the ticks follow the cameras' clock and the measured round
trip, drifting with them.

The phase moves smoothly: two consecutive deadlines are never less than ``MIN_GAP`` (3/4) of a period
apart, nor more than 5/4 of one (unless the loop itself fell behind: whole ticks missed are skipped, never
burst). The lower bound holds on the ticks' actual start times too: a tick that started late (a loaded
machine) pushes the next deadline to at least ``MIN_GAP`` after that start, so the servo never gets two goals
closer than that. Pure arithmetic on the monotonic clock, no sockets; lockstep does not use it.

The control loop runs over one of two pacers: ``RealtimePacer`` (the above, serving the loop's sockets while it
waits) or ``LockstepPacer`` (a tick per new observation of the dataset player, time in frame indices).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from common.config import DeploymentConfig
from nodes.actuator.core import ControlCore
from nodes.actuator.inputs import InputBook

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
        # How far (seconds, signed) the ticks' phase still has to move to the locked one: set by each reply (the
        # shorter way round), used up by the ticks at most MAX_SHIFT of a period each. Kept signed, never wrapped
        # again: a correction later is made later, however far a tick pulled early for a reply moved it first.
        self.remaining = 0.0
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
        self._move(max(-self.max_shift_s, min(self.max_shift_s, self.remaining)))
        return skipped

    def arrived(self, t: float) -> None:
        """A reply landed at ``t``. The pending tick moves to just after it (``LEAD_S``), as far as the bounds allow
        (never sooner than ``MIN_GAP`` after the last tick, nor later than 5/4 of a period): the reply's rows run
        at once. The ticks after it steer to the phase the next reply is expected at (this one's plus the
        measured slip), the shorter way round from the pending tick's place before this reply moved it."""
        if self.last_arrival is not None:
            # A camera whose clock drifts against the ticks moves the replies' phase by about as much each time:
            # aim at where the next one will land, not where this one did.
            self.slip += SLIP_GAIN * (self._wrapped(t - self.last_arrival) - self.slip)
        self.last_arrival = t
        self.remaining = self._wrapped(t + self.lead_s + max(0.0, self.slip) - self.nominal)
        self._move(min(max(t + self.lead_s - self.nominal, -self.max_shift_s), self.max_shift_s))

    def phase_error(self) -> float:
        """How far (seconds, signed) the ticks' phase still has to move to the locked one (0 before any reply)."""
        return self.remaining

    def _wrapped(self, delta: float) -> float:
        """``delta`` seconds as a phase: within half a period either side of 0."""
        return (delta + self.period / 2) % self.period - self.period / 2

    def _move(self, shift: float) -> None:
        """The pending tick at ``nominal + shift``, or later where the last tick started late (never sooner than
        ``MIN_GAP`` after it); what it moved is taken off the correction still to make."""
        self.deadline = max(self.nominal + shift, self.last_started + self.period - self.max_shift_s)
        self.remaining -= self.deadline - self.nominal


# ==================================================================================================
# The two pacers the control loop (nodes.actuator.loop) runs over: when its ticks come and in what time units
# ==================================================================================================


@dataclass(frozen=True)
class Tick:
    """One tick of the control loop."""

    now: float  # when it started (monotonic)
    key: float  # the core's time of this tick: its scheduled time (real time) or its frame index (lockstep)
    lateness: float = 0.0  # how long after its scheduled time it started (0 in lockstep)
    early: bool = False  # the pacer moved it ahead of one period after the last: it may take the next row early
    rewound: bool = False  # lockstep: the player went back (a new dataset episode)
    frame_index: int | None = None  # lockstep: the frame index it runs (real time: the inputs' own)


class RealtimePacer:
    """One tick per period at the task's fps on the monotonic clock, phase-locked to the replies
    (``PhaseLockedPacer``); policy results count as arriving when they are taken."""

    lockstep = False

    def __init__(self, fps: float) -> None:
        self.timing = f"{fps} Hz, phase-locked to the replies"
        self.phase = PhaseLockedPacer(1.0 / fps)
        self.missed = 0  # whole ticks skipped because the loop fell behind
        self._started = False

    def new_core(self, config: DeploymentConfig) -> ControlCore:
        """The core, in this pacer's time units: seconds of the monotonic clock."""
        return ControlCore(config)

    def clock(self) -> float:
        """Now, in the core's time units."""
        return time.monotonic()

    def input_clock(self) -> float | None:
        """The time a capture stamp is checked against (refused when ahead by more than ``actuator.max_future_s``;
        stale when too old)."""
        return time.monotonic()

    def next_tick(self, serve: Callable[[float], None], stop: threading.Event, inputs: InputBook) -> Tick | None:
        """Serve inputs, results and control requests until the next deadline (which a landing reply may move;
        zmq polls in whole milliseconds, the rest is a short sleep), then the tick."""
        del inputs
        if not self._started:
            self._started = True
            self.phase.start(time.monotonic())
        while not stop.is_set():
            remaining = self.phase.deadline - time.monotonic()
            if remaining <= 0:
                break
            if remaining < 0.002:
                time.sleep(remaining)
                break
            serve(remaining - 0.001)
        started, deadline = time.monotonic(), self.phase.deadline
        return Tick(now=started, key=deadline, lateness=started - deadline,
                    early=deadline < self.phase.nominal - 1e-6)

    def done(self, tick: Tick) -> None:
        self.missed += self.phase.advance(time.monotonic(), started=tick.now)

    def arrived(self, t: float) -> None:
        """A reply to a request that left with its frames landed at ``t``: the ticks' phase follows it."""
        self.phase.arrived(t)

    @property
    def deadline(self) -> float:
        return self.phase.deadline


class LockstepPacer:
    """One tick per new complete observation (the dataset player's frames); time is the frame index. A tick asks
    for a chunk from its very observation and waits for it, so a slow policy slows the replay instead of dropping
    rows (row j of a chunk from frame i runs at frame i + j)."""

    lockstep = True
    timing = "lockstep"
    missed = 0

    def __init__(self) -> None:
        self.last_t: dict[str, float] = {}  # per camera and arm: the capture time used at the last tick
        self.key = -1  # the current tick's frame index

    def new_core(self, config: DeploymentConfig) -> ControlCore:
        """The core in frame indices (``period`` 1); a chunk is never too old, being asked for its very frame."""
        return ControlCore(config, period=1.0, max_chunk_age=math.inf, lockstep=True)

    def clock(self) -> float:
        return float(self.key)

    def input_clock(self) -> float | None:
        return None  # the stamps are the player's: neither their age nor the future is checked

    def next_tick(self, serve: Callable[[float], None], stop: threading.Event, inputs: InputBook) -> Tick | None:
        """Serve for a moment; a tick once every camera and arm delivered a message newer than the ones used at
        the last tick (None until then: the loop still checks the contract and starts the episode, since the player
        may wait for the actuator before it publishes anything)."""
        serve(0.02)
        if stop.is_set() or not inputs.complete():
            return None
        parts = {**inputs.frames, **inputs.states}
        if any(msg.t <= self.last_t.get(name, -math.inf) for name, msg in parts.items()):
            return None
        self.last_t = {name: msg.t for name, msg in parts.items()}
        index = inputs.frame_index()
        key = index if index >= 0 else self.key + 1
        rewound = key < self.key
        self.key = key
        return Tick(now=time.monotonic(), key=float(key), rewound=rewound, frame_index=key)

    def done(self, tick: Tick) -> None:
        del tick

    def arrived(self, t: float) -> None:
        del t  # the phase is the player's
