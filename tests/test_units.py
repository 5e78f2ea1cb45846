"""Units (issue 25, item 1): an arm's limits, max_step and rest_pose are in its declared units
(``arms.<arm>.use_degrees``), numbers that cannot be in them are refused naming the field, each task ships a
range-mode variant (``configs/<task>-range.yaml``) kept in step with its degrees file here, and the units
refusal says what to change. End to end: a checkpoint trained on a range-mode dataset, refused on
``configs/lift.yaml``, drives the emulated arm on ``configs/lift-range.yaml`` (real policy node, actuator and
servo emulator).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import NodeProcess, wait_for, write_config
from test_actuator import EventTap, SensorFeed, control, ready_detail, start_actuator, start_policy
from test_lying_peer import LIFT_RANGE_MODE, contract_with_stats, range_mode_dataset

from common.config import REPO_ROOT, SO101_JOINTS, ConfigError, load_config
from common.wire.contract import units_differences

TASKS = ("lift", "stack", "sort")


def write_arm(tmp_path: Path, **arm: object) -> Path:
    return write_config(tmp_path, "lift", {"arms": {"main": arm}})


@pytest.mark.parametrize("arm, field, words", [
    # lift's degree limits with the arm declared in range mode: -110 cannot be a range-mode value
    ({"use_degrees": False}, "arms.main.lower_limits", ["shoulder_pan is -110", "-100..100", "use_degrees: true"]),
    ({"use_degrees": False, "lower_limits": [-90, -85, -85, -85, -80, 0], "upper_limits": [90, 85, 85, 85, 80, 100]},
     "arms.main.rest_pose", ["shoulder_lift rests at -90", "-85..85"]),
    ({"upper_limits": [110, 100, 100, 100, 150, 4095]}, "arms.main.upper_limits", ["gripper is 4095", "0..100"]),
    ({"upper_limits": [110, 100, 100, 100, 200, 100]}, "arms.main.upper_limits", ["wrist_roll is 200", "-180..180"]),
    ({"rest_pose": [0, -120, 90, 60, 0, 10]}, "arms.main.rest_pose", ["shoulder_lift rests at -120", "-100..100"]),
])
def test_numbers_that_cannot_be_in_the_arms_units_are_refused_naming_the_field(
        tmp_path: Path, arm: dict, field: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(write_arm(tmp_path, **arm))
    assert refused.value.field == field, refused.value
    for word in words:
        assert word in str(refused.value), refused.value
    assert 'docs/configuration.md, "Units"' in str(refused.value)


def degrees_to_range(value: float, calibration: dict) -> float:
    """docs/configuration.md, "Units": LeRobot's two norm modes of one body joint (drive_mode 0)."""
    return value * 4095 * 200 / (360 * (calibration["range_max"] - calibration["range_min"]))


@pytest.mark.parametrize("task", TASKS)
def test_each_task_ships_a_range_mode_variant_converted_from_its_degrees(task: str) -> None:
    degrees = load_config(REPO_ROOT / "configs" / f"{task}.yaml")
    ranged = load_config(REPO_ROOT / "configs" / f"{task}-range.yaml")
    assert list(ranged.arms) == list(degrees.arms)
    for name, arm in ranged.arms.items():
        source = degrees.arms[name]
        assert source.use_degrees and not arm.use_degrees
        calibration = json.loads((REPO_ROOT / arm.calibration_dir / f"{arm.robot_id}.json").read_text())
        for key in ("lower_limits", "upper_limits", "max_step", "rest_pose"):
            for joint, theirs, ours in zip(SO101_JOINTS, getattr(source, key), getattr(arm, key), strict=True):
                want = theirs if joint == "gripper" else degrees_to_range(theirs, calibration[joint])
                if key != "max_step":
                    want = min(max(want, -100.0), 100.0)
                assert abs(ours - want) <= 0.1 + 1e-9, f"{task} arms.{name}.{key} {joint}: {ours}, converted {want}"
                # Rounded towards safety: limits inwards, steps down.
                if key == "lower_limits":
                    assert ours >= want - 1e-9
                elif key in ("upper_limits", "max_step"):
                    assert ours <= want + 1e-9
    # Everything else is the degrees file's.
    strip = {"lower_limits", "upper_limits", "max_step", "rest_pose", "use_degrees"}
    for name in ranged.arms:
        a, b = dataclasses.asdict(ranged.arms[name]), dataclasses.asdict(degrees.arms[name])
        assert {k: v for k, v in a.items() if k not in strip} == {k: v for k, v in b.items() if k not in strip}
    assert {k: v for k, v in dataclasses.asdict(ranged).items() if k != "arms"} == \
        {k: v for k, v in dataclasses.asdict(degrees).items() if k != "arms"}


def test_the_units_refusal_says_what_to_change_and_the_range_variant_takes_the_checkpoint() -> None:
    lift = load_config(REPO_ROOT / "configs" / "lift.yaml")
    problems = units_differences(contract_with_stats(lift, LIFT_RANGE_MODE), lift)
    fix = problems[-1]
    assert fix.startswith("what to change:"), problems
    assert "arms.main.use_degrees: false" in fix and "configs/lift-range.yaml" in fix, fix
    assert "actuator.units_mismatch_intended: true" in fix, fix
    # Doing what it says: the range-mode variant has nothing left to refuse.
    ranged = load_config(REPO_ROOT / "configs" / "lift-range.yaml")
    assert units_differences(contract_with_stats(ranged, LIFT_RANGE_MODE), ranged) == []
    # And the other way round: degree stats on the range-mode arm point back to degrees.
    degrees = {"min": [-105.0, -95.0, -95.0, -100.0, -150.0, 0.0], "max": [100.0, 90.0, 95.0, 100.0, 140.0, 90.0],
               "mean": [0.0] * 6}
    back = units_differences(contract_with_stats(ranged, degrees), ranged)
    assert "arms.main.use_degrees: true" in back[-1] and "configs/lift.yaml" in back[-1], back


def test_a_range_mode_checkpoint_drives_the_emulated_arm_on_the_range_variant(
        tmp_path: Path, node_processes: list[NodeProcess], tmp_path_factory: pytest.TempPathFactory) -> None:
    from common.tools.checkpoint_maker import build_checkpoint

    overrides = {
        "actuator": {"refill_rows": 10, "max_chunk_age_s": 1.0},
        "cameras": {name: {"width": 64, "height": 48, "max_age_s": 0.5} for name in ("front", "wrist")},
        "arms": {"main": {"max_state_age_s": 0.5}},
        "emulator": {"record_goals": True},
    }
    config_path = write_config(tmp_path, "lift-range", overrides)
    config = load_config(config_path)
    dataset = range_mode_dataset(tmp_path / "lift-range-mode", config)
    checkpoint = build_checkpoint(config, tmp_path_factory.mktemp("ckpt-range"), dataset_root=dataset, size="tiny")
    config_path = write_config(tmp_path, "lift-range", {
        **overrides, "policy": {"checkpoint": str(checkpoint), "warmup": 0, "timeout_s": 10.0,
                                "num_inference_steps": 2}})
    config = load_config(config_path)
    emulator = NodeProcess("servo_emulator", config_path, name="main").start()
    node_processes.append(emulator)
    emulator.wait_ready(60)
    start_policy(node_processes, config_path)
    rest = np.asarray(config.arms["main"].rest_pose, np.float32)
    feed = SensorFeed(config, hz=30, position=rest).start()
    tap = EventTap(config)
    try:
        actuator = start_actuator(node_processes, config_path).wait_ready(60)
        assert ready_detail(actuator)["contract"] == "ok", ready_detail(actuator)
        assert control(config, "start").meta["state"] == "running"
        tap.wait_action(lambda m: not m.meta["hold"], 120, message=f"no row ran:\n{actuator.log()[-3000:]}")
        goals = Path(config.run_dir) / "stats" / "servo_emulator-main-goals.jsonl"

        def moved() -> bool:
            writes = [json.loads(line) for line in goals.read_text().splitlines()] if goals.exists() else []
            return any(w["torque"] and w["goal"] != w["before"] for w in writes)

        wait_for(moved, 30, message="the emulated servos never got a new goal")
        executed = [np.asarray(m.arrays["action"]) for m in tap.actions() if not m.meta["hold"]]
        lower, upper = np.asarray(config.arms["main"].lower_limits), np.asarray(config.arms["main"].upper_limits)
        assert all(np.all(row >= lower - 1e-4) and np.all(row <= upper + 1e-4) for row in executed)
        assert not math.isnan(float(executed[-1][0]))
    finally:
        tap.close()
        feed.close()
