"""Deployment configs: the three task layouts load, overrides apply, bad values name their field."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO_ROOT

from common.config import ConfigError, load_config, parse_node_args
from common.wire.contract import PolicyContract, contract_differences


@pytest.mark.parametrize(("task", "cameras", "state_dim"), [
    ("lift", ["front", "wrist"], 6),
    ("stack", ["front", "wrist"], 6),
    ("sort", ["front", "left_wrist", "right_wrist"], 12),
])
def test_task_layouts_match_the_design(task, cameras, state_dim):
    config = load_config(REPO_ROOT / "configs" / f"{task}.yaml")
    assert config.task == task and config.fps == 30
    assert list(config.cameras) == cameras
    assert all(shape == [480, 640, 3] for shape in config.image_shapes().values())
    names = config.state_names()
    assert len(names) == state_dim and names[0].endswith("shoulder_pan.pos")
    if state_dim == 12:
        assert names[:6] == [n for n in names if n.startswith("left_")]
        assert names[6:] == [n for n in names if n.startswith("right_")]


def test_overrides_are_parsed_as_yaml_and_nested():
    config = load_config(REPO_ROOT / "configs" / "lift.yaml", [
        "--policy.device=auto", "--cameras.front.encoding=jpeg", "--actuator.dry_run=true",
        "--player.episodes=[0, 2]", "--arms.main.max_step=[1,1,1,1,1,1]",
    ])
    assert config.policy.device == "auto"
    assert config.cameras["front"].encoding == "jpeg"
    assert config.actuator.dry_run is True
    assert config.player.episodes == [0, 2]
    assert config.max_step() == [1.0] * 6


@pytest.mark.parametrize(("override", "field"), [
    ("--fps=fast", "fps"),
    ("--cameras.front.width=wide", "cameras.front.width"),
    ("--cameras.front.backend=kinect", "cameras.front.backend"),
    ("--arms.main.lower_limits=[0,0]", "arms.main.lower_limits"),
    ("--arms.main.upper_limits=[-200,100,100,100,150,100]", "arms.main.lower_limits"),
    ("--policy.device=tpu", "policy.device"),
    ("--actuator.overlap=average", "actuator.overlap"),
    ("--policy.rtc_guidance=cosine", "policy.rtc_guidance"),
    ("--actuator.rtc_soft_rows=-1", "actuator.rtc_soft_rows"),
    ("--actuator.nice=40", "actuator.nice"),
    ("--policy.nonexistent=1", "policy"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        load_config(REPO_ROOT / "configs" / "lift.yaml", [override])
    assert info.value.field == field
    assert field in str(info.value)


def test_cuda_graphs_need_a_warmup_pass() -> None:
    # The warm-up records the graphs; without it the first robot's request would record them all.
    lift = REPO_ROOT / "configs" / "lift.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(lift, ["--policy.cuda_graphs=true", "--policy.warmup=0"])
    assert info.value.field == "policy.warmup" and "policy.cuda_graphs" in str(info.value)
    with pytest.raises(ConfigError, match=r"policy\.warmup"):
        load_config(lift, ["--policy.warmup=-1"])
    assert load_config(lift, ["--policy.cuda_graphs=true", "--policy.warmup=1"]).policy.warmup == 1
    assert load_config(lift, ["--policy.warmup=0"]).policy.warmup == 0


def test_missing_config_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_node_command_line_takes_config_name_and_overrides():
    args = parse_node_args("test", ["--config", str(REPO_ROOT / "configs/sort.yaml"), "--name", "left",
                                    "--arms.left.read_hz=10"])
    assert args.name == "left" and args.config.arms["left"].read_hz == 10


def _contract_for(task: str) -> PolicyContract:
    config = load_config(REPO_ROOT / "configs" / f"{task}.yaml")
    return PolicyContract(policy_type="diffusion", cameras=config.image_shapes(), state_names=config.state_names(),
                          action_names=config.action_names(), chunk_length=8, n_obs_steps=2, fps=30,
                          checkpoint_id="x")


def test_contract_mismatch_says_what_differs():
    sort = load_config(REPO_ROOT / "configs" / "sort.yaml")
    assert contract_differences(_contract_for("sort"), sort) == []
    differences = contract_differences(_contract_for("lift"), sort)
    text = "\n".join(differences)
    assert "policy expects 6 values, config has 12" in text
    assert "action: policy returns 6 values" in text
    assert "wrist" in text  # the lift policy needs a camera 'wrist' that sort does not have


def test_node_command_line_exits_2_naming_the_field():
    with pytest.raises(SystemExit) as info:
        parse_node_args("test", ["--config", str(REPO_ROOT / "configs/lift.yaml"), "--policy.device=tpu"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        parse_node_args("test", ["--config", str(REPO_ROOT / "configs/lift.yaml"), "--name", "elbow"],
                        instance_of="arm")
    assert info.value.code == 2


def test_node_instance_defaults_to_the_first_and_is_checked():
    args = parse_node_args("test", ["--config", str(REPO_ROOT / "configs/sort.yaml")], instance_of="camera")
    assert args.name == "front"
    args = parse_node_args("test", ["--config", str(REPO_ROOT / "configs/sort.yaml"), "--name", "right"],
                           instance_of="arm")
    assert args.name == "right"
