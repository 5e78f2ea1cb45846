"""The checkpoint maker writes real LeRobot checkpoints that LeRobot itself loads and runs offline."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO_ROOT

from common.config import load_config
from common.tools.checkpoint_maker import SIDECAR_NAME, build_checkpoint, synthesised_stats


def _load_lerobot(path: Path):
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    policy_config = PreTrainedConfig.from_pretrained(path, local_files_only=True)
    policy = get_policy_class(policy_config.type).from_pretrained(path, config=policy_config, local_files_only=True)
    pre, post = make_pre_post_processors(policy_config, pretrained_path=str(path))
    return policy_config, policy.eval(), pre, post


def _observation(config, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    obs = {f"observation.images.{name}": torch.from_numpy(
        rng.random((3, cam.height, cam.width), dtype=np.float32)) for name, cam in config.cameras.items()}
    lower, upper = np.array(config.lower_limits()), np.array(config.upper_limits())
    obs["observation.state"] = torch.from_numpy(rng.uniform(lower, upper).astype(np.float32))
    return obs


def test_tiny_diffusion_checkpoint_loads_and_predicts_in_robot_units(tiny_checkpoint) -> None:
    config = load_config(REPO_ROOT / "configs" / "lift.yaml")
    path = tiny_checkpoint("lift", "diffusion")
    assert path.name == "pretrained_model"
    for name in ("config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json"):
        assert (path / name).is_file(), name
    sidecar = json.loads((path / SIDECAR_NAME).read_text())
    assert sidecar["untrained"] is True
    assert sidecar["task"] == "lift"
    assert sidecar["state_names"] == config.state_names()
    assert sidecar["action_names"] == config.action_names()
    assert sidecar["fps"] == config.fps

    policy_config, policy, pre, post = _load_lerobot(path)
    assert policy_config.type == "diffusion"
    assert set(policy_config.image_features) == {"observation.images.front", "observation.images.wrist"}
    assert policy_config.image_features["observation.images.front"].shape == (3, 480, 640)
    assert policy_config.robot_state_feature.shape == (6,)
    assert policy_config.action_feature.shape == (6,)

    rng = np.random.default_rng(0)
    # DiffusionPolicy needs n_obs_steps frames: select_action fills its queue by repeating the first one.
    batch = pre(_observation(config, rng))
    action = post(policy.select_action(batch))
    assert action.shape == (1, 6)
    chunk_len = policy_config.n_action_steps
    assert len(policy._queues["action"]) == chunk_len - 1
    values = action.numpy()[0]
    assert np.all(np.isfinite(values))
    # clip_sample keeps normalised actions in [-1, 1]; MIN_MAX unnormalisation maps that onto the limits.
    assert np.all(values >= np.array(config.lower_limits()) - 1e-3)
    assert np.all(values <= np.array(config.upper_limits()) + 1e-3)


def test_act_checkpoint_for_two_arms_has_twelve_joints_and_three_cameras(tmp_path: Path) -> None:
    config = load_config(REPO_ROOT / "configs" / "sort.yaml")
    path = build_checkpoint(config, tmp_path / "sort-act", policy_type="act", size="tiny")
    policy_config, policy, pre, post = _load_lerobot(path)
    assert policy_config.type == "act"
    assert set(policy_config.image_features) == {f"observation.images.{c}" for c in ("front", "left_wrist",
                                                                                     "right_wrist")}
    assert policy_config.action_feature.shape == (12,)
    batch = pre(_observation(config, np.random.default_rng(1)))
    chunk = post(policy.predict_action_chunk(batch))
    assert chunk.shape == (1, policy_config.chunk_size, 12)
    assert torch.isfinite(chunk).all()
    assert json.loads((path / SIDECAR_NAME).read_text())["untrained"] is True


def test_synthesised_stats_come_from_joint_limits() -> None:
    config = load_config(REPO_ROOT / "configs" / "sort.yaml")
    stats = synthesised_stats(config)
    np.testing.assert_allclose(stats["observation.state"]["min"], config.lower_limits())
    np.testing.assert_allclose(stats["action"]["max"], config.upper_limits())
    assert stats["observation.images.left_wrist"]["mean"].shape == (3, 1, 1)


def test_cli_uses_dataset_stats_when_given(tmp_path: Path) -> None:
    from lerobot.datasets.io_utils import write_stats

    config = load_config(REPO_ROOT / "configs" / "lift.yaml")
    stats = synthesised_stats(config)
    # Distinctive values, so the test sees they came from the dataset and not from the limits.
    stats["action"]["min"] = np.full(6, -7.0, np.float32)
    stats["action"]["max"] = np.full(6, 9.0, np.float32)
    dataset = tmp_path / "dataset"
    write_stats(stats, dataset)
    output = tmp_path / "ckpt"
    result = subprocess.run(
        [PYTHON, "-m", "common.tools.checkpoint_maker", "--config", str(REPO_ROOT / "configs" / "lift.yaml"),
         "--policy-type", "diffusion", "--size", "tiny", "--output", str(output), "--dataset", str(dataset)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    state = load_file(output / "pretrained_model" / "policy_postprocessor_step_0_unnormalizer_processor.safetensors")
    np.testing.assert_allclose(state["action.min"].numpy(), -7.0)
    np.testing.assert_allclose(state["action.max"].numpy(), 9.0)
    assert "dataset" in json.loads((output / "pretrained_model" / SIDECAR_NAME).read_text())["stats_source"]


def test_dataset_without_a_camera_is_refused_naming_it(tmp_path: Path) -> None:
    from lerobot.datasets.io_utils import write_stats

    config = load_config(REPO_ROOT / "configs" / "lift.yaml")
    stats = synthesised_stats(config)
    del stats["observation.images.wrist"]
    write_stats(stats, tmp_path / "dataset")
    with pytest.raises(ValueError, match=r"observation\.images\.wrist"):
        build_checkpoint(config, tmp_path / "ckpt", dataset_root=tmp_path / "dataset")


def test_tiny_smolvla_loads_offline_with_lerobots_own_loader(tiny_checkpoint, monkeypatch, tmp_path) -> None:
    # The VLM's config, processor and tokenizer were made locally and are where LeRobot's loader reads them
    # (config.json's vlm_model_name, the tokenizer step's tokenizer_name): no hub, no cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    config = load_config(REPO_ROOT / "configs" / "lift.yaml")
    path = tiny_checkpoint("lift", "smolvla")
    saved = json.loads((path / "config.json").read_text())
    assert saved["vlm_model_name"] == str(path / "vlm") and saved["load_vlm_weights"] is False
    for name in ("config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (path / "vlm" / name).is_file(), name
    policy_config, policy, pre, post = _load_lerobot(path)
    assert policy_config.type == "smolvla"
    batch = _observation(config, np.random.default_rng(0))
    batch["task"] = "pick up the red cube"
    processed = pre(batch)
    assert processed["observation.language.tokens"].shape[0] == 1
    chunk = post(policy.predict_action_chunk(processed))
    assert chunk.shape == (1, 50, 6) and torch.isfinite(chunk).all()


@pytest.mark.parametrize("policy_type", ["pi0", "pi05"])
def test_tiny_pi0_and_pi05_load_offline_with_lerobots_own_loader(policy_type, tiny_checkpoint, monkeypatch,
                                                                 tmp_path) -> None:
    # LeRobot's own loader, with armpipe's small sizes registered (common.lerobot_pi_sizes): the config names the
    # registered variants, the weights are small, and the PaliGemma-style tokenizer made locally is the one the
    # saved tokenizer step names (no hub, no cache).
    from common.lerobot_pi_sizes import TINY_EXPERT, TINY_VLM, VARIANTS, register

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    config = load_config(REPO_ROOT / "configs" / "lift.yaml")
    path = tiny_checkpoint("lift", policy_type)
    saved = json.loads((path / "config.json").read_text())
    assert (saved["paligemma_variant"], saved["action_expert_variant"]) == (TINY_VLM, TINY_EXPERT)
    assert (path / "model.safetensors").stat().st_size < 5_000_000
    steps = json.loads((path / "policy_preprocessor.json").read_text())["steps"]
    tokenizer = next(step["config"]["tokenizer_name"] for step in steps
                     if step["registry_name"] == "tokenizer_processor")
    assert tokenizer == str((path / "tokenizer").resolve()) and (path / "tokenizer" / "tokenizer.json").is_file()
    register(policy_type)
    policy_config, policy, pre, post = _load_lerobot(path)
    assert policy_config.type == policy_type
    assert policy.model.action_in_proj.out_features == VARIANTS[TINY_EXPERT].width
    assert sum(p.numel() for p in policy.parameters()) < 1_000_000
    batch = _observation(config, np.random.default_rng(0))
    batch["task"] = "pick up the red cube"
    chunk = post(policy.predict_action_chunk(pre(batch)))
    assert chunk.shape == (1, 50, 6) and torch.isfinite(chunk).all()
