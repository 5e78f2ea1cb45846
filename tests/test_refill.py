"""The actuator's refill decisions (``ControlCore``): when to ask for the next chunk from a measured round
trip, and what an ``rtc`` request carries. Real config, real queue, no sockets."""

from __future__ import annotations

import math

import numpy as np

from common.config import REPO_ROOT, load_config
from common.wire.contract import PolicyContract, contract_differences
from nodes.actuator.core import ControlCore

FPS = 30
PERIOD = 1.0 / FPS


def core_for(*overrides: str, lockstep: bool = False) -> ControlCore:
    config = load_config(REPO_ROOT / "configs" / "lift.yaml", list(overrides))
    # As the lockstep loop builds it: frame time, and no chunk is ever too old there.
    core = ControlCore(config, period=1.0 if lockstep else None, max_chunk_age=math.inf if lockstep else None,
                       lockstep=lockstep)
    core.set_contract(True, [])
    core.start()
    core.tick(0.0, "", np.zeros(6, np.float32))  # anchors on the measured position
    return core


def ramp(rows: int, start: float = 0.0) -> np.ndarray:
    return np.repeat((start + np.arange(rows, dtype=np.float32))[:, None], 6, axis=1)


def test_the_next_chunk_is_asked_for_when_the_rows_left_cover_the_measured_round_trip() -> None:
    core = core_for()
    assert core.set_chunk_rows(8, 15) == ""
    for _ in range(5):
        core.on_round_trip(0.100, 0.08)  # 100 ms = 3 ticks, plus one row to spare
    core.on_chunk(ramp(8), obs_t=0.0, now=0.0, generation=core.generation)
    asked = []
    for tick in range(8):
        now = tick * PERIOD
        decision = core.tick(now, "", np.zeros(6, np.float32))
        assert not decision.hold
        asked.append(core.wants_chunk(now))
    # After tick 3 rows 4..7 are left: 4 rows cover 100 ms + one tick. Not before.
    assert asked == [False, False, False, True, True, True, True, True]


def test_rtc_request_carries_what_ran_and_what_will_run() -> None:
    core = core_for("--actuator.overlap=rtc", "--actuator.rtc_soft_rows=2")
    core.set_chunk_rows(8, 15)
    for _ in range(5):
        core.on_round_trip(0.100, None)
    # rtc asks rtc_soft_rows (2) rows earlier than replace would (4 rows for 100 ms): at 6 rows left.
    assert core.refill.threshold() == 6
    core.on_chunk(ramp(8), obs_t=0.0, now=0.0, generation=core.generation)
    for tick in range(4):
        core.tick(tick * PERIOD, "", np.zeros(6, np.float32))
    # Observation from tick 3 (now), sent now: 3 rows pass before the reply (100 ms), 2 soft rows after them.
    prefix, delay = core.rtc_prefix(obs_t=3 * PERIOD, observation_age=0.0)
    assert delay == 3
    np.testing.assert_array_equal(prefix[:, 0], [3, 4, 5, 6, 7])
    # With the policy's guidance rows (predicted after the chunk, never run) the soft rows go on past the
    # queue: 3 frozen + 8 soft (the default rtc_soft_rows) = rows 3..13, of which 8..13 are guidance.
    guided = core_for("--actuator.overlap=rtc")
    guided.set_chunk_rows(8, 15)
    for _ in range(5):
        guided.on_round_trip(0.100, None)
    guided.on_chunk(ramp(8), obs_t=0.0, now=0.0, generation=guided.generation, guide=ramp(7, start=8))
    for tick in range(4):
        assert not guided.tick(tick * PERIOD, "", np.zeros(6, np.float32)).hold
    prefix, delay = guided.rtc_prefix(obs_t=3 * PERIOD, observation_age=0.0)
    assert delay == 3
    np.testing.assert_array_equal(prefix[:, 0], np.arange(3, 14))
    # Under blend the guide is not kept: the prefix is never asked for and must not outlive its chunk.
    blend = core_for("--actuator.overlap=blend")
    blend.on_chunk(ramp(8), obs_t=0.0, now=0.0, generation=blend.generation, guide=ramp(7, start=8))
    assert len(blend.queue.prefix(7 * PERIOD, 4)) == 1
    # Not under replace/blend, nor with a policy that cannot continue a prefix.
    assert core_for("--actuator.overlap=blend").rtc_prefix(0.0, 0.0) == (None, 0)
    no_rtc = core_for("--actuator.overlap=rtc")
    no_rtc.set_chunk_rows(8, 0)
    assert no_rtc.rtc_prefix(0.0, 0.0) == (None, 0)


def test_lockstep_honours_the_checkpoints_chunking_and_clips_an_oversized_refill_rows() -> None:
    measured = core_for(lockstep=True)
    measured.set_chunk_rows(8, 0)
    measured.on_round_trip(0.0, None)
    measured.on_chunk(ramp(8), obs_t=0.0, now=0.0, generation=measured.generation)
    wants = []
    for frame in range(8):
        wants.append(measured.wants_chunk(float(frame)))
        measured.tick(float(frame), "", np.zeros(6, np.float32))
    assert wants == [False] * 8 and measured.wants_chunk(8.0)  # a new chunk every 8 frames, not every frame

    shipped = core_for("--actuator.refill_rows=24", lockstep=True)
    problem = shipped.set_chunk_rows(8, 0)
    assert "refill_rows=24" in problem and "using 7" in problem
    assert shipped.refill.threshold() == 7


def test_rtc_with_a_policy_that_cannot_continue_a_prefix_is_a_contract_difference() -> None:
    config = load_config(REPO_ROOT / "configs" / "lift.yaml", ["--actuator.overlap=rtc"])
    contract = PolicyContract(policy_type="act", cameras=config.image_shapes(), state_names=config.state_names(),
                              action_names=config.action_names(), chunk_length=20, n_obs_steps=1, fps=config.fps,
                              checkpoint_id="x", extra={"rtc_max_prefix_rows": 0})
    assert any("actuator.overlap: rtc" in problem for problem in contract_differences(contract, config))
    contract.extra["rtc_max_prefix_rows"] = 15
    assert contract_differences(contract, config) == []
