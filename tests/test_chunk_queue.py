"""Timestamped chunk scheduling: row k of a chunk from an observation at t runs at t + k/fps."""

from __future__ import annotations

import numpy as np
import pytest

from common.chunk_queue import ChunkQueue

FPS = 30
PERIOD = 1.0 / FPS


def chunk(rows: int, dim: int = 2, start: float = 0.0) -> np.ndarray:
    """Row k holds the value start + k in every column, so a popped row says which row it was."""
    return np.repeat((start + np.arange(rows, dtype=np.float32))[:, None], dim, axis=1)


def test_rows_run_at_obs_time_plus_k_periods() -> None:
    q = ChunkQueue(PERIOD, "replace", action_dim=2)
    obs_t = 100.0
    result = q.insert(chunk(8), obs_t, now=obs_t)
    assert (result.accepted, result.dropped_stale) == (8, 0)
    for k in range(8):
        row, row_t, row_obs_t = q.pop(obs_t + k * PERIOD)
        assert row[0] == k
        assert row_t == pytest.approx(obs_t + k * PERIOD)
        assert row_obs_t == obs_t
    assert q.pop(obs_t + 8 * PERIOD) is None


def test_rows_already_past_on_arrival_are_dropped() -> None:
    q = ChunkQueue(PERIOD, "replace", action_dim=2)
    obs_t = 50.0
    # The reply arrives 3.2 ticks after the observation: rows 0..2 are meant for ticks that have passed.
    now = obs_t + 3.2 * PERIOD
    result = q.insert(chunk(8), obs_t, now=now)
    assert (result.rows, result.accepted, result.dropped_stale) == (8, 5, 3)
    row, _, _ = q.pop(now)
    assert row[0] == 3


def test_a_late_tick_skips_rows_and_never_replays_them() -> None:
    q = ChunkQueue(PERIOD, "replace", action_dim=2)
    q.insert(chunk(8), 0.0, now=0.0)
    assert q.pop(0.0)[0][0] == 0
    # Two ticks were missed: rows 1 and 2 expire unexecuted.
    assert q.pop(3 * PERIOD)[0][0] == 3
    assert q.expired == 2
    # Going back in time (e.g. a repeated tick) never brings a row back.
    assert q.pop(PERIOD) is None
    popped = [q.pop(k * PERIOD)[0][0] for k in range(4, 8)]
    assert popped == [4, 5, 6, 7]
    assert len(q) == 0


def test_each_row_runs_at_most_once_per_tick_slot() -> None:
    q = ChunkQueue(PERIOD, "replace", action_dim=2)
    q.insert(chunk(4), 0.0, now=0.0)
    assert q.pop(0.0)[0][0] == 0
    # A second tick in the same slot finds the next row in the future: nothing to run.
    assert q.pop(0.4 * PERIOD) is None
    assert q.pop(PERIOD)[0][0] == 1


def test_replace_discards_the_queued_rows() -> None:
    q = ChunkQueue(PERIOD, "replace", action_dim=2)
    q.insert(chunk(8, start=100), 0.0, now=0.0)
    q.pop(0.0)
    # A new chunk from an observation one tick later, arriving at tick 2.
    result = q.insert(chunk(8, start=200), PERIOD, now=2 * PERIOD)
    assert result.replaced == 6  # rows for ticks 2..7; the row for tick 1 had expired unexecuted
    assert result.dropped_stale == 1  # its row 0 was meant for tick 1
    assert result.blended == 0
    assert q.pop(2 * PERIOD)[0][0] == 201


def test_blend_weights_old_and_new_rows_of_the_same_tick() -> None:
    q = ChunkQueue(PERIOD, "blend", blend_old_weight=0.25, action_dim=2)
    q.insert(chunk(8, start=100), 0.0, now=0.0)
    q.pop(0.0)
    # Offset by a fraction of a tick: rows still pair with the queued row meant for the same slot.
    obs_t = PERIOD + 0.1 * PERIOD
    result = q.insert(chunk(8, start=200), obs_t, now=2 * PERIOD)
    assert result.dropped_stale == 1
    # Old rows for ticks 2..7 overlap new rows 1..6; new row 7 (tick 8) has no old partner.
    assert result.blended == 6
    for tick in range(2, 8):
        row = q.pop(tick * PERIOD)[0]
        old, new = 100 + tick, 200 + (tick - 1)
        assert row[0] == pytest.approx(0.25 * old + 0.75 * new)
    assert q.pop(8 * PERIOD)[0][0] == 207


def test_blend_weight_one_keeps_the_old_rows_where_they_overlap() -> None:
    q = ChunkQueue(PERIOD, "blend", blend_old_weight=1.0, action_dim=2)
    q.insert(chunk(4, start=10), 0.0, now=0.0)
    q.insert(chunk(4, start=20), 0.0, now=0.0)
    assert [q.pop(k * PERIOD)[0][0] for k in range(4)] == [10, 11, 12, 13]


def test_lockstep_frames_use_period_one() -> None:
    """Row j of a chunk from frame i runs at frame i + j."""
    q = ChunkQueue(1.0, "replace", action_dim=2)
    q.insert(chunk(4, start=0), 10, now=10)
    assert [q.pop(frame)[0][0] for frame in (10, 11, 12, 13)] == [0, 1, 2, 3]
    assert q.pop(14) is None


def test_depth_counts_rows_still_to_run() -> None:
    q = ChunkQueue(PERIOD, "replace", action_dim=2)
    q.insert(chunk(8), 0.0, now=0.0)
    assert q.depth(0.0) == 8
    assert q.depth(5 * PERIOD) == 3
    assert q.clear() == 8
    assert q.depth(0.0) == 0


@pytest.mark.parametrize("bad", [np.zeros((0, 2), np.float32), np.zeros((4, 3), np.float32), np.zeros(4, np.float32)])
def test_malformed_chunks_are_refused_with_the_shape(bad: np.ndarray) -> None:
    q = ChunkQueue(PERIOD, "replace", action_dim=2)
    with pytest.raises(ValueError, match="chunk"):
        q.insert(bad, 0.0, now=0.0)
    assert len(q) == 0


def test_unknown_overlap_rule_names_the_field() -> None:
    with pytest.raises(ValueError, match="overlap"):
        ChunkQueue(PERIOD, "average")
