"""Timestamped chunk scheduling: row k of a chunk from an observation at t runs at t + k/fps."""

from __future__ import annotations

import numpy as np
import pytest

from nodes.actuator.chunk_queue import ChunkQueue

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


# ------------------------------------------------------------------------------------------------ rtc prefix


def test_prefix_is_what_ran_then_what_is_queued_on_the_new_observations_grid() -> None:
    q = ChunkQueue(PERIOD, "rtc", action_dim=2)
    q.insert(chunk(8), 0.0, now=0.0)
    for k in range(3):  # rows 0..2 run
        q.pop(k * PERIOD)
    # A request from an observation taken at tick 1 (older than now, tick 2): its row k is for tick 1 + k.
    prefix = q.prefix(obs_t=1 * PERIOD + 0.004, max_rows=5)
    np.testing.assert_array_equal(prefix[:, 0], [1, 2, 3, 4, 5])
    # Asking past the queue's end stops at the first slot without a row.
    assert len(q.prefix(obs_t=PERIOD, max_rows=20)) == 7
    # A slot half a period off the grid matches nothing: no prefix rather than a wrong one.
    assert len(q.prefix(obs_t=-3 * PERIOD, max_rows=5)) == 0
    q.clear()
    assert len(q.prefix(obs_t=PERIOD, max_rows=5)) == 0


def test_prefix_goes_on_with_the_newest_chunks_guide_rows() -> None:
    q = ChunkQueue(PERIOD, "rtc", action_dim=2)
    # 8 rows for ticks 0..7, then the policy's guidance rows 8..11 (never executed) for ticks 8..11.
    q.insert(chunk(8), 0.0, now=0.0, guide=chunk(4, start=8))
    for k in range(5):
        q.pop(k * PERIOD)
    prefix = q.prefix(obs_t=4 * PERIOD, max_rows=10)
    np.testing.assert_array_equal(prefix[:, 0], [4, 5, 6, 7, 8, 9, 10, 11])  # ran, queued, guide; then no row
    assert q.depth(4 * PERIOD) == 3  # guide rows are not queued: they never run
    popped = [q.pop(k * PERIOD) for k in range(5, 10)]
    assert [p[0][0] for p in popped[:3]] == [5, 6, 7] and popped[3:] == [None, None]
    # The next chunk's guide replaces it; a chunk without one leaves none.
    q.insert(chunk(8, start=100), 8 * PERIOD, now=8 * PERIOD, guide=chunk(2, start=108))
    np.testing.assert_array_equal(q.prefix(obs_t=14 * PERIOD, max_rows=6)[:, 0], [106, 107, 108, 109])
    q.insert(chunk(8, start=200), 9 * PERIOD, now=9 * PERIOD)
    assert len(q.prefix(obs_t=17 * PERIOD, max_rows=4)) == 0
    with pytest.raises(ValueError, match="guide"):
        q.insert(chunk(8), 9 * PERIOD, now=9 * PERIOD, guide=np.zeros((3, 5), np.float32))
    q.insert(chunk(8), 9 * PERIOD, now=9 * PERIOD, guide=chunk(3, start=8))
    q.clear()
    assert len(q.prefix(obs_t=17 * PERIOD, max_rows=4)) == 0


def test_rtc_merges_like_replace() -> None:
    q = ChunkQueue(PERIOD, "rtc", action_dim=2)
    q.insert(chunk(8), 0.0, now=0.0)
    result = q.insert(chunk(8, start=100), 2 * PERIOD, now=2 * PERIOD)
    assert (result.blended, result.replaced) == (0, 6)  # rows 0 and 1 had expired
    assert q.pop(2 * PERIOD)[0][0] == 100


# ------------------------------------------------------------------------------------------------ refill


def test_refill_threshold_covers_the_measured_p90_round_trip() -> None:
    from nodes.actuator.refill import RefillPlanner

    planner = RefillPlanner(PERIOD, FPS)
    planner.set_chunk_rows(8)
    assert planner.threshold() == 4  # before any measurement: half a chunk
    for _ in range(18):
        assert planner.record(0.100) is None  # 100 ms: fits inside a 267 ms chunk, nothing to say
    planner.record(0.150)
    planner.record(0.150)
    # p90 of 18 x 100 ms and 2 x 150 ms is 105 ms: 3.15 rows, rounded up, plus the one-row margin.
    assert planner.round_trip() == pytest.approx(0.105)
    assert planner.threshold() == 5
    # The frozen rtc prefix: rows of a chunk asked for now that will not run from it. Sent after this tick's
    # row, it is taken 4 ticks on (105 ms > 3 ticks); an observation 30 ms old starts its rows a row earlier.
    assert planner.delay_rows(observation_age=0.0) == 4
    assert planner.delay_rows(observation_age=0.030) == 5
    fresh = RefillPlanner(PERIOD, FPS)
    assert fresh.delay_rows() == 1  # nothing measured: the reply can be taken at the next tick at the earliest
    # A round trip longer than the chunk asks at once (at most chunk - 1 rows: never on a full queue).
    for _ in range(20):
        planner.record(0.5)
    assert planner.threshold() == 7


def test_refill_timing_keeps_acting_with_a_100ms_round_trip() -> None:
    """8-row chunks at 30 Hz, replies 100 ms after each request: every tick after the first chunk acts."""
    from nodes.actuator.refill import RefillPlanner

    q = ChunkQueue(PERIOD, "replace", action_dim=2)
    planner = RefillPlanner(PERIOD, FPS)
    planner.set_chunk_rows(8)
    in_flight: tuple[float, float] | None = None  # (sent at, obs_t)
    acted = 0
    ticks = 300
    for tick in range(ticks):
        now = tick * PERIOD
        if in_flight is not None and now >= in_flight[0] + 0.100 - 1e-9:
            q.insert(chunk(8), in_flight[1], now=in_flight[0] + 0.100)
            planner.record(0.100)
            in_flight = None
        acted += q.pop(now) is not None
        if in_flight is None and q.depth(now) <= planner.threshold():
            in_flight = (now, now)
    assert acted >= ticks - 5  # the first chunk's wait only


def test_a_round_trip_longer_than_the_chunk_is_reported_once_with_the_numbers() -> None:
    from nodes.actuator.refill import RefillPlanner

    planner = RefillPlanner(PERIOD, FPS)
    planner.set_chunk_rows(8)
    notices = [planner.record(0.300, inference_s=0.280) for _ in range(30)]
    said = [n for n in notices if n is not None]
    assert len(said) == 1
    notice = said[0]
    assert notice.covered is False
    assert (notice.chunk_rows, notice.fps) == (8, FPS)
    assert notice.round_trip_s == pytest.approx(0.300)
    for text in ("300 ms", "8 rows", "267 ms", "30 Hz", "280 ms", "num_inference_steps", "policy.rows: horizon"):
        assert text in notice.message
    # Back under a chunk: said once as well, then silence.
    back = [planner.record(0.05) for _ in range(30)]
    assert [n.covered for n in back if n is not None] == [True]


def test_refill_override_is_clipped_below_the_chunk_once() -> None:
    from nodes.actuator.refill import RefillPlanner

    planner = RefillPlanner(1.0, FPS, override=24, margin_rows=0)
    planner.set_chunk_rows(8)
    assert planner.threshold() == 7
    problem = planner.override_problem()
    assert "refill_rows=24" in problem and "8 rows" in problem and "using 7" in problem
    assert planner.override_problem() == ""
    # Lockstep, measured: the request waits for its chunk (round trip 0 frames), so a new chunk comes when
    # the queue is empty: every 8 frames, the checkpoint's own chunking.
    lockstep = RefillPlanner(1.0, FPS, margin_rows=0)
    lockstep.set_chunk_rows(8)
    lockstep.record(0.0)
    assert lockstep.threshold() == 0
