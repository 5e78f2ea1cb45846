"""Where a recording is cut so that it never compresses time.

A LeRobot episode's frames are ``1/fps`` apart (``timestamp = frame_index / fps``, and each video frame
sits at that time). A recording that lost ticks (the writer fell behind, messages lost in transit, the
recorder restarted, the actuator itself skipped ticks it was too late for) and stored the rest back to
back would show motion faster than it happened. So a recording is cut at every gap into *parts*: each
part is one LeRobot episode of the recording's dataset whose frames are consecutive ticks of the
actuator, and the part's ``start_s`` says where it starts in true time (seconds after the recording's
first frame). The parts are listed in ``meta/info.json`` (``armpipe_parts``), in the metrics and in
``summary.json``.

A tick's true time is when the actuator scheduled it: its ``t`` minus its ``lateness_s``. A real-time
actuator schedules ticks one period apart, but its phase follows the data (nodes/actuator/pacer.py moves a
tick by up to a quarter period to land right after a policy reply, and so the ticks follow the cameras'
clock), so they can drift off a part's ``1/fps`` grid without any tick missing. A part is also cut where a
tick is more than ``MAX_DRIFT_PERIODS`` of a period off its part's grid: every frame's time in the recording
is within that of its true time. In lockstep (``actuator.lockstep``) time is the replayed frames', so only
gaps in the actuator's ``episode_tick`` numbers cut.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

MAX_DRIFT_PERIODS = 0.5  # a frame's time in the recording is within half a period of when the actuator scheduled it


def _scheduled(row: dict[str, Any]) -> float:
    t = float(row.get("t", math.nan))
    lateness = row.get("lateness_s")
    if isinstance(lateness, (int, float)) and math.isfinite(lateness):
        t -= float(lateness)
    return t


def split_parts(rows: Sequence[dict[str, Any]], fps: float, *, lockstep: bool = False,
                breaks: Sequence[int] = ()) -> list[dict[str, Any]]:
    """The parts of a recording whose frames are ``rows`` (ticks.parquet rows: ``t``, ``lateness_s``,
    ``episode_tick``), in order. Each part: ``part``, ``from_frame``, ``frames``, ``start_s``,
    ``first_episode_tick``, the gap before it (``gap_ticks``: ticks not recorded, ``gap_s``) and ``segment``.
    ``breaks``: frame indices where a part starts in any case (a new video segment after a restart)."""
    forced = set(breaks)
    period = 1.0 / float(fps)
    parts: list[dict[str, Any]] = []
    first_t = previous_t = part_t = math.nan
    previous_tick = -1
    for index, row in enumerate(rows):
        scheduled = _scheduled(row)
        episode_tick = int(row.get("episode_tick", -1))
        missing = 0
        drifted = False
        if parts:
            if episode_tick >= 0 and previous_tick >= 0:
                missing = episode_tick - previous_tick - 1
            if not lockstep and math.isfinite(scheduled) and math.isfinite(previous_t):
                missing = max(missing, round((scheduled - previous_t) / period) - 1)
            if not lockstep and math.isfinite(scheduled) and math.isfinite(part_t):
                # On the part's grid this frame sits at part_t + frames * period.
                drifted = abs(scheduled - (part_t + parts[-1]["frames"] * period)) > MAX_DRIFT_PERIODS * period
        if not parts:
            first_t = scheduled
        if not parts or missing > 0 or drifted or index in forced:
            part_t = scheduled
            start_s = scheduled - first_t if math.isfinite(scheduled) and math.isfinite(first_t) else math.nan
            if lockstep or not math.isfinite(start_s):
                # Time in lockstep is the tick count: where this part would start had nothing been missed.
                start_s = (parts[-1]["start_s"] + (parts[-1]["frames"] + missing) * period) if parts else 0.0
            parts.append({"part": len(parts), "from_frame": index, "frames": 0, "start_s": float(start_s),
                          "first_episode_tick": episode_tick, "gap_ticks": int(max(missing, 0)),
                          "gap_s": float(max(missing, 0) * period),
                          # the video segment (file) it is in: one more after each recorder restart
                          "segment": sum(1 for start in forced if start <= index)})
        parts[-1]["frames"] += 1
        previous_t, previous_tick = scheduled, episode_tick
    return parts


def gap_summary(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the metrics say about a recording's parts: how many, and the gaps between them."""
    gaps = [{"before_part": int(part["part"]), "ticks": int(part["gap_ticks"]), "seconds": float(part["gap_s"]),
             "at_s": float(part["start_s"])} for part in parts[1:]]
    return {"parts": len(parts) if parts else 1, "gaps": gaps, "gap_s": float(sum(g["seconds"] for g in gaps))}
