"""The actuator's safety layer: every commanded target is inside the joint limits and within one step.

Two invariants hold for every target this module returns, whatever the policy sent:

1. ``lower <= target <= upper`` for every joint (the configured joint limits);
2. ``|target - previous target| <= max_step`` for every joint, where the previous target is the last
   one this filter commanded (or its anchor, the measured position clamped to the limits, before the
   first command of an episode).

A row with NaN or infinity anywhere is rejected as a whole (``bad_action``): partially trusting a
corrupt row is worse than holding. Holding commands the previous target again, which trivially keeps
both invariants; nothing here ever re-sends an old policy row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

BAD_ACTION = "bad_action"


class SafetyFilter:
    """Clamps targets to joint limits and limits how far they move per tick from the last command."""

    def __init__(self, lower: Sequence[float], upper: Sequence[float], max_step: Sequence[float],
                 names: Sequence[str] | None = None) -> None:
        self.lower = np.asarray(lower, dtype=np.float32)
        self.upper = np.asarray(upper, dtype=np.float32)
        self.max_step = np.asarray(max_step, dtype=np.float32)
        if not (self.lower.shape == self.upper.shape == self.max_step.shape and self.lower.ndim == 1):
            raise ValueError(f"limits: expected lower, upper and max_step of one length, got "
                             f"{self.lower.shape}, {self.upper.shape}, {self.max_step.shape}")
        if not (np.all(np.isfinite(self.lower)) and np.all(np.isfinite(self.upper))
                and np.all(self.lower < self.upper)):
            raise ValueError("limits: expected finite lower < upper for every joint")
        if not (np.all(np.isfinite(self.max_step)) and np.all(self.max_step > 0)):
            raise ValueError("max_step: expected a finite positive step for every joint")
        self.names = list(names) if names is not None else [f"joint{i}" for i in range(self.dim)]
        self.last: np.ndarray | None = None  # the last commanded target (or the anchor)

    @property
    def dim(self) -> int:
        return int(self.lower.shape[0])

    # ------------------------------------------------------------------ checks
    def check_row(self, row: np.ndarray) -> str:
        """``""`` when ``row`` is usable, else a message naming what is wrong with it."""
        row = np.asarray(row)
        if row.shape != (self.dim,):
            return f"action row: expected {self.dim} values, got shape {row.shape}"
        if not np.issubdtype(row.dtype, np.number):
            return f"action row: expected numbers, got dtype {row.dtype}"
        bad = ~np.isfinite(row)
        if bad.any():
            joints = [self.names[i] for i in np.flatnonzero(bad)]
            return f"action row: non-finite values (NaN/inf) for {joints}"
        return ""

    # ------------------------------------------------------------------ anchoring
    def anchor(self, measured: np.ndarray) -> bool:
        """Start from the measured position (clamped to the limits); False if it is unusable.

        The clamp keeps invariant 1 even for an arm resting outside the configured limits; the first
        hold then asks the servo to move to the nearest limit, and that is logged.
        """
        measured = np.asarray(measured, dtype=np.float32)
        if measured.shape != (self.dim,) or not np.all(np.isfinite(measured)):
            return False
        clamped = np.clip(measured, self.lower, self.upper)
        outside = np.flatnonzero(clamped != measured)
        if outside.size:
            log.warning("measured position outside the joint limits for %s; holding at the limit instead",
                        {self.names[i]: float(measured[i]) for i in outside})
        self.last = clamped
        return True

    @property
    def anchored(self) -> bool:
        return self.last is not None

    def release(self) -> None:
        """Forget the last command (next episode re-anchors on the measured position)."""
        self.last = None

    # ------------------------------------------------------------------ commands
    def command(self, target: np.ndarray, step: np.ndarray | float | None = None) -> np.ndarray:
        """The safe target to command this tick on the way to ``target``; remembered as the last command.

        ``target`` must have passed ``check_row``; ``step`` may only shrink the configured max step
        (a slow move to the rest pose).
        """
        if self.last is None:
            raise RuntimeError("SafetyFilter.command before anchor(): no reference position")
        target = np.asarray(target, dtype=np.float32)
        if self.check_row(target):
            raise ValueError(self.check_row(target))
        limit = self.max_step if step is None else np.minimum(self.max_step, np.float32(np.abs(step)))
        # Work in float64 so the checks below are exact, then round to float32 towards the last command:
        # a rounding step away from it could exceed the max step by one ulp.
        last = self.last.astype(np.float64)
        limit64 = limit.astype(np.float64)
        clamped = np.clip(target.astype(np.float64), self.lower, self.upper)
        moved = np.clip(last + np.clip(clamped - last, -limit64, limit64), self.lower, self.upper)
        safe = moved.astype(np.float32)
        overshoot = np.abs(safe.astype(np.float64) - last) > limit64
        safe[overshoot] = np.nextafter(safe[overshoot], self.last[overshoot])
        safe = np.clip(safe, self.lower, self.upper)
        self.last = safe
        return safe.copy()

    def hold(self) -> np.ndarray:
        """The target to command while holding: the last command again."""
        if self.last is None:
            raise RuntimeError("SafetyFilter.hold before anchor(): no reference position")
        return self.last.copy()
