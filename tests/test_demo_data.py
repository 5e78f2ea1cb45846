"""Demo datasets: each task's layout written by LeRobot's writer, smooth in-limit motion, action =
next state, and pictures that move with the joints."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import PYTHON, REPO_ROOT

from common.config import SO101_JOINTS, DeploymentConfig, load_config
from common.dataset_source import DatasetSource, EpisodeReader
from common.tools.demo_data import DemoSpec, episode_trajectory, generate_demo_dataset, render_camera

WIDTH, HEIGHT, FRAMES = 96, 64, 12


def small(task: str) -> DeploymentConfig:
    """The task's config with small cameras (the layout is what matters here, not the resolution)."""
    path = REPO_ROOT / "configs" / f"{task}.yaml"
    cameras = load_config(path).cameras
    return load_config(path, [f"--cameras.{name}.width={WIDTH}" for name in cameras]
                       + [f"--cameras.{name}.height={HEIGHT}" for name in cameras])


@pytest.mark.parametrize("task", ["lift", "stack", "sort"])
def test_demo_dataset_has_the_task_layout(task: str, tmp_path: Path) -> None:
    config = small(task)
    root = generate_demo_dataset(config, tmp_path / f"{task}-demo",
                                 DemoSpec(episodes=2, frames=FRAMES, width=WIDTH, height=HEIGHT))
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 30
    assert (info["total_episodes"], info["total_frames"]) == (2, 2 * FRAMES)
    names = config.state_names()
    assert info["features"]["observation.state"]["names"] == names
    assert info["features"]["action"]["names"] == names
    cameras = sorted(key.removeprefix("observation.images.") for key in info["features"]
                     if key.startswith("observation.images."))
    assert cameras == sorted(config.cameras)
    for camera in config.cameras:
        feature = info["features"][f"observation.images.{camera}"]
        assert feature["dtype"] == "video" and feature["shape"] == [HEIGHT, WIDTH, 3]
        assert feature["info"]["video.codec"] == "av1"
    if task == "sort":
        assert len(names) == 12 and names[0] == "left_shoulder_pan.pos" and names[6] == "right_shoulder_pan.pos"

    rows = pq.read_table(sorted((root / "data").rglob("*.parquet"))).to_pandas()
    for episode in (0, 1):
        frame = rows[rows["episode_index"] == episode].sort_values("frame_index")
        states = np.stack(frame["observation.state"].to_numpy())
        actions = np.stack(frame["action"].to_numpy())
        assert states.shape == (FRAMES, len(names))
        # Inside the limits, never faster than the actuator's per-tick step, and action = next state.
        assert np.all(states >= np.array(config.lower_limits())) and np.all(states <= np.array(config.upper_limits()))
        assert np.all(np.abs(np.diff(states, axis=0)) <= np.array(config.max_step()))
        np.testing.assert_array_equal(actions[:-1], states[1:])
        np.testing.assert_array_equal(actions[-1], states[-1])
        assert np.ptp(states, axis=0).min() > 0, "every joint moves"
    assert not np.allclose(np.stack(rows[rows["episode_index"] == 0]["observation.state"].to_numpy()),
                           np.stack(rows[rows["episode_index"] == 1]["observation.state"].to_numpy()))

    # The videos decode (through the player's reader) to the drawing of each row's joints.
    source = DatasetSource(config, dataset=root)
    reader = EpisodeReader(source, 1)
    decoded = [reader.next() for _ in range(FRAMES)]
    assert reader.next() is None
    reader.close()
    states = source.episode(1).states
    for camera in config.cameras:
        for index in (0, FRAMES - 1):
            errors = [np.abs(decoded[index][camera].astype(np.int16)
                             - render_camera(camera, config, state, k, FRAMES, WIDTH, HEIGHT)).mean()
                      for k, state in enumerate(states)]
            assert int(np.argmin(errors)) == index, (camera, index)


@pytest.mark.parametrize("task", ["lift", "sort"])
def test_every_joint_moves_the_picture(task: str) -> None:
    config = load_config(REPO_ROOT / "configs" / f"{task}.yaml")
    state = episode_trajectory(config, 0, 1)[0]
    for camera in config.cameras:
        base = render_camera(camera, config, state, 5, 10, 320, 240)
        changed = []
        for joint in range(len(state)):
            moved = state.copy()
            moved[joint] += 20.0 if SO101_JOINTS[joint % 6] != "gripper" else -30.0
            changed.append(np.abs(render_camera(camera, config, moved, 5, 10, 320, 240).astype(np.int16)
                                  - base).sum() > 0)
        arms = len(config.arms)
        if "wrist" in camera:
            # A wrist camera follows its own arm: its pan, wrist flex, roll and gripper show; the other arm's don't.
            own = 0 if arms == 1 or camera.startswith("left_") else 1
            for joint in range(len(state)):
                name = SO101_JOINTS[joint % 6]
                expected = joint // 6 == own and name in ("shoulder_pan", "wrist_flex", "wrist_roll", "gripper")
                assert changed[joint] == expected, (camera, joint)
        else:
            assert all(changed), (camera, changed)
    # And time shows: the progress bar moves even when the joints do not.
    camera = next(iter(config.cameras))
    assert not np.array_equal(render_camera(camera, config, state, 1, 10, 320, 240),
                              render_camera(camera, config, state, 8, 10, 320, 240))


def test_cli_writes_a_dataset_and_refuses_to_overwrite(tmp_path: Path) -> None:
    output = tmp_path / "stack-demo"
    command = [PYTHON, "-m", "common.tools.demo_data", "--task", "stack", "--output", str(output), "--episodes", "1",
               "--frames", "8", "--width", "64", "--height", "64", "--codec", "h264"]
    first = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-2000:]
    info = json.loads((output / "meta" / "info.json").read_text())
    assert info["total_frames"] == 8 and info["features"]["observation.images.front"]["info"]["video.codec"] == "h264"
    assert info["robot_type"] == "so101_follower"
    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    bad = subprocess.run([*command[:-2], "--codec", "av1", "--width", "63", "--overwrite"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=240)
    assert bad.returncode == 2 and "--width" in bad.stderr
