"""The safety layer: whatever the policy sends, every commanded target stays inside the joint limits
and moves at most ``max_step`` per tick from the previous one.

The property tests feed adversarial chunks (NaN, inf, huge jumps, out-of-range values, odd timing)
through the actuator's real decision code (``nodes.actuator.core.ControlCore``: chunk queue + safety filter
+ hold logic + episode stop/rest moves) and check both invariants on every tick.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.config import REPO_ROOT, load_config
from nodes.actuator.core import HOLD_BAD_ACTION, ControlCore
from nodes.actuator.safety import SafetyFilter

LOWER = np.array([-110, -100, -100, -100, -150, 0], dtype=np.float32)
UPPER = np.array([110, 100, 100, 100, 150, 100], dtype=np.float32)
STEP = np.array([3, 3, 3, 3, 5, 5], dtype=np.float32)

# Values a broken or hostile policy might send: NaN, +-inf, float32 extremes, huge jumps, normal values.
adversarial_value = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 1e6, -1e6, 0.0, 100.0, -150.0, 1e-40]),
    st.floats(-400, 400, width=32),
)


def assert_safe(target: np.ndarray, previous: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                step: np.ndarray) -> None:
    target64, previous64 = target.astype(np.float64), previous.astype(np.float64)
    assert np.all(np.isfinite(target)), target
    assert np.all(target64 >= lower) and np.all(target64 <= upper), (target, lower, upper)
    assert np.all(np.abs(target64 - previous64) <= step.astype(np.float64)), (target, previous, step)


@settings(max_examples=300, deadline=None)
@given(measured=hnp.arrays(np.float32, 6, elements=st.floats(-400, 400, width=32)),
       targets=st.lists(hnp.arrays(np.float32, 6, elements=adversarial_value), min_size=1, max_size=40))
def test_filter_never_leaves_limits_or_exceeds_max_step(measured: np.ndarray, targets: list[np.ndarray]) -> None:
    safety = SafetyFilter(LOWER, UPPER, STEP)
    assert safety.anchor(measured)
    previous = safety.hold()
    assert np.all(previous >= LOWER) and np.all(previous <= UPPER)
    for target in targets:
        if safety.check_row(target):
            # A row with NaN/inf is refused whole: the command is the previous one again.
            assert not np.all(np.isfinite(target))
            command = safety.hold()
        else:
            command = safety.command(target)
        assert_safe(command, previous, LOWER, UPPER, STEP)
        previous = command


def test_nan_row_is_refused_naming_the_joint() -> None:
    safety = SafetyFilter(LOWER, UPPER, STEP, names=["a", "b", "c", "d", "e", "f"])
    row = np.array([0, np.nan, 0, np.inf, 0, 0], dtype=np.float32)
    problem = safety.check_row(row)
    assert "b" in problem and "d" in problem and "a'" not in problem
    assert safety.check_row(np.zeros(5, np.float32)).startswith("action row: expected 6 values")


def test_far_target_is_approached_one_step_per_tick_and_clamped() -> None:
    safety = SafetyFilter(LOWER, UPPER, STEP)
    safety.anchor(np.zeros(6, np.float32))
    target = np.array([1000, -1000, 10, 0, 0, 1000], dtype=np.float32)
    first = safety.command(target)
    np.testing.assert_allclose(first, [3, -3, 3, 0, 0, 5])
    for _ in range(200):
        last = safety.command(target)
    np.testing.assert_allclose(last, [110, -100, 10, 0, 0, 100])


def test_anchor_outside_limits_is_clamped_and_nan_anchor_refused() -> None:
    safety = SafetyFilter(LOWER, UPPER, STEP)
    assert not safety.anchor(np.array([0, 0, np.nan, 0, 0, 0], np.float32))
    assert not safety.anchored
    assert safety.anchor(np.array([-130, 0, 0, 0, 0, 120], np.float32))
    np.testing.assert_allclose(safety.hold(), [-110, 0, 0, 0, 0, 100])


# ----------------------------------------------------------------------------------------------------
# End to end through the actuator's decision code
# ----------------------------------------------------------------------------------------------------

SORT = load_config(REPO_ROOT / "configs" / "sort.yaml")
SORT_LOWER = np.asarray(SORT.lower_limits(), np.float32)
SORT_UPPER = np.asarray(SORT.upper_limits(), np.float32)
SORT_STEP = np.asarray(SORT.max_step(), np.float32)
DIM = len(SORT.action_names())
PERIOD = 1.0 / SORT.fps

chunk_strategy = st.integers(1, 12).flatmap(
    lambda rows: hnp.arrays(np.float32, (rows, DIM), elements=adversarial_value))
operation = st.one_of(
    st.tuples(st.just("chunk"), chunk_strategy, st.floats(-3, 1)),  # obs_t offset in ticks (<0: late reply)
    # ticks to advance; inputs fresh, stale, or the bus not taking writes
    st.tuples(st.just("tick"), st.integers(1, 4), st.sampled_from(["fresh", "stale", "bus"])),
    st.tuples(st.just("stop"), st.sampled_from(["", "success", "failure"]), st.none()),
    st.tuples(st.just("start"), st.none(), st.none()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(measured=hnp.arrays(np.float32, DIM, elements=st.floats(-300, 300, width=32)),
       overlap=st.sampled_from(["replace", "blend"]),
       operations=st.lists(operation, min_size=1, max_size=60))
def test_control_core_commands_stay_safe_under_adversarial_chunks(measured: np.ndarray, overlap: str,
                                                                  operations: list[tuple]) -> None:
    SORT.actuator.overlap = overlap
    core = ControlCore(SORT)
    core.set_contract(True, [])
    core.start()
    now = 1000.0
    previous: np.ndarray | None = None
    for kind, first, second in operations:
        if kind == "chunk":
            core.on_chunk(first, now + second * PERIOD, now, core.generation)
            continue
        if kind == "stop":
            if core.episodes.state == "running":
                core.stop(first)
            continue
        if kind == "start":
            if core.episodes.state != "running":
                core.start()
                previous = None  # a new episode re-anchors on the measured position
            continue
        for _ in range(first):
            now += PERIOD
            decision = core.tick(now, "stale_state" if second == "stale" else "", measured,
                                 "bus_error" if second == "bus" else "")
            if not decision.write:
                continue
            if previous is None:
                previous = np.clip(measured, SORT_LOWER, SORT_UPPER)
            assert_safe(decision.target, previous, SORT_LOWER, SORT_UPPER, SORT_STEP)
            if second == "bus":
                # A target that cannot reach the servo never becomes the reference for the next step.
                assert decision.hold and decision.reason == "bus_error"
            if decision.hold:
                # Holding never invents a new target: it is the last command again (or the slow rest move).
                assert decision.reason == "stopped" or np.array_equal(decision.target, previous)
            previous = decision.target


def test_bad_row_is_a_bad_action_hold_and_the_next_good_row_runs() -> None:
    core = ControlCore(SORT)
    core.set_contract(True, [])
    core.start()
    measured = np.zeros(DIM, np.float32)
    chunk = np.zeros((3, DIM), np.float32)
    chunk[0, 4] = np.nan
    chunk[1, :] = 1.0
    now = 10.0
    core.on_chunk(chunk, now, now, core.generation)
    decision = core.tick(now, "", measured)
    assert decision.hold and decision.reason == HOLD_BAD_ACTION and "nan" in decision.detail.lower()
    np.testing.assert_array_equal(decision.target, np.zeros(DIM))
    decision = core.tick(now + PERIOD, "", measured)
    assert not decision.hold
    np.testing.assert_allclose(decision.target, np.ones(DIM))


@pytest.mark.parametrize("reason", ["stale_state", "stale_frame", "missing_input"])
def test_stale_inputs_hold_and_rows_expire_instead_of_running_late(reason: str) -> None:
    core = ControlCore(SORT)
    core.set_contract(True, [])
    core.start()
    measured = np.zeros(DIM, np.float32)
    now = 5.0
    core.on_chunk(np.tile(np.arange(8, dtype=np.float32)[:, None], (1, DIM)) * 0.5, now, now, core.generation)
    assert not core.tick(now, "", measured).hold
    for k in range(1, 4):
        decision = core.tick(now + k * PERIOD, reason, measured)
        assert decision.hold and decision.reason == reason
        np.testing.assert_array_equal(decision.target, np.zeros(DIM))
    # Back to fresh inputs at tick 4: rows 1..3 were never executed, row 4 runs now.
    decision = core.tick(now + 4 * PERIOD, "", measured)
    assert not decision.hold
    np.testing.assert_allclose(decision.target, np.full(DIM, 2.0))
