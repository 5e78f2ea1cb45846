"""A recording resumed across recorder restarts is cut into video segments, one per process that wrote it:
where the segments break, a camera's pixel histogram over them, and the ticks each restart's downtime cost."""

from __future__ import annotations

from typing import Any

import numpy as np

from nodes.recorder.lerobot_v3 import OneEpisodeDataset
from nodes.recorder.records import DROP_RECORDER_RESTARTED
from nodes.recorder.video import PixelHistogram, decoded_histogram


def segment_histograms(dataset: OneEpisodeDataset, key: str, segment_frames: list[int]) -> PixelHistogram:
    """The pixel histogram of a camera's frames in the segments given (decoded back from their streams)."""
    histogram = PixelHistogram()
    for segment, frames in enumerate(segment_frames):
        if frames:
            histogram.counts += decoded_histogram(dataset.stream_path(key, segment), frames).counts
    return histogram


def segment_breaks(segment_frames: list[int]) -> list[int]:
    """The frame index where each video segment after the first starts."""
    return [int(start) for start in np.cumsum(segment_frames)[:-1]]


def count_restarts(dropped: dict[str, int], rows: list[dict[str, Any]], breaks: list[int]) -> dict[str, int]:
    """``dropped`` with the ticks of every restart's downtime (where a video segment starts), counted from the
    recording itself (a killed process could not hand its count on): the actuator's ``episode_tick`` numbers
    between the last frame before the break and the first after it, the very ticks the backlog fills in.
    Not the part's ``gap_ticks``: that is the gap in true time, which also spans slots the actuator itself
    skipped (it fell behind) or a phase shift of its ticks, where no tick ran and nothing is to be filled."""
    restarted = 0
    for start in breaks:
        if 0 < start < len(rows):
            before, after = int(rows[start - 1].get("episode_tick", -1)), int(rows[start].get("episode_tick", -1))
            if before >= 0 and after >= 0:
                restarted += max(after - before - 1, 0)
    counted = {**dropped}
    counted.pop(DROP_RECORDER_RESTARTED, None)
    if restarted:
        counted[DROP_RECORDER_RESTARTED] = restarted
    return counted
