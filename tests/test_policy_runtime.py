"""The policy runtime against LeRobot's own plain path, plus validation, sessions and checkpoint discovery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, write_config

from common.config import load_config
from common.tools.checkpoint_maker import make_policy_config
from common.wire.protocol import Message, ProtocolError
from nodes.policy.checkpoint import CheckpointError, layout_differences, load_lerobot_policy, resolve_checkpoint
from nodes.policy.io import validate_request
from nodes.policy.runtime import PolicyRuntime
from nodes.policy.sessions import SessionStore, session_seed
from nodes.policy.speed import MatmulConv1d, MatmulConvTranspose1d

LIFT_CAMERAS = {"front": [480, 640, 3], "wrist": [480, 640, 3]}


def make_runtime(tmp_path: Path, checkpoint: Path, task: str = "lift", **policy: object) -> PolicyRuntime:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_config(tmp_path, task, {"policy": {"checkpoint": str(checkpoint), "cpu_threads": 1, **policy}})
    return PolicyRuntime(load_config(path))


def observation(config, seed: int, client: str = "robot-a") -> Message:
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {
        f"observation.images.{name}": rng.integers(0, 256, (cam.height, cam.width, 3), dtype=np.uint8)
        for name, cam in config.cameras.items()}
    lower, upper = np.array(config.lower_limits()), np.array(config.upper_limits())
    arrays["observation.state"] = rng.uniform(lower, upper).astype(np.float32)
    return Message(kind="request", meta={"op": "infer", "client": client, "obs_t": 12.5}, arrays=arrays)


def lerobot_batch(pre, msg: Message) -> dict[str, torch.Tensor]:
    """LeRobot's robot-side convention (float [0, 1], channels first) through LeRobot's preprocessor."""
    raw = {key: torch.from_numpy(np.array(value)).permute(2, 0, 1).float() / 255
           for key, value in msg.arrays.items() if key.startswith("observation.images.")}
    raw["observation.state"] = torch.from_numpy(np.array(msg.arrays["observation.state"]))
    return {key: value for key, value in pre(raw).items() if isinstance(value, torch.Tensor)}


def stacked(*frames: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([frame[key] for frame in frames], dim=1) for key in frames[0]}


@pytest.fixture(scope="module")
def lift_diffusion(tiny_checkpoint, tmp_path_factory) -> PolicyRuntime:
    return make_runtime(tmp_path_factory.mktemp("rt"), tiny_checkpoint("lift", "diffusion"))


# ------------------------------------------------------------------------------------------------ numerics


def test_diffusion_chunks_match_lerobot_plain_path_with_history(lift_diffusion: PolicyRuntime) -> None:
    runtime = lift_diffusion
    first, second = observation(runtime.config, 1), observation(runtime.config, 2)
    runtime.reset("robot-a")
    chunk1 = runtime.infer("robot-a", first)
    chunk2 = runtime.infer("robot-a", second)
    assert chunk1.actions.shape == (runtime.contract.chunk_length, 6) == (8, 6)
    assert chunk1.actions.dtype == np.float32
    assert set(chunk1.timings) == {"decode_s", "queue_s", "preprocess_s", "inference_s", "postprocess_s", "total_s"}

    _, policy, pre, post = load_lerobot_policy(runtime.path, torch.device("cpu"))
    a, b = lerobot_batch(pre, first), lerobot_batch(pre, second)
    generator = torch.Generator().manual_seed(session_seed(runtime.config.policy.seed, "robot-a"))
    noise1 = torch.randn(1, 16, 6, generator=generator)
    noise2 = torch.randn(1, 16, 6, generator=generator)
    # The first request repeats the observation n_obs_steps times (LeRobot's queue does the same).
    expected1 = post(policy.predict_action_chunk(stacked(a, a), noise=noise1))[0].numpy()
    expected2 = post(policy.predict_action_chunk(stacked(a, b), noise=noise2))[0].numpy()
    np.testing.assert_allclose(chunk1.actions, expected1, rtol=1e-5, atol=2e-3)
    np.testing.assert_allclose(chunk2.actions, expected2, rtol=1e-5, atol=2e-3)
    assert not np.allclose(chunk1.actions, chunk2.actions)


def test_ddpm_override_matches_lerobot_ddpm(tiny_checkpoint, tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint("lift", "diffusion")
    runtime = make_runtime(tmp_path, checkpoint, noise_scheduler="DDPM", num_inference_steps=10)
    assert runtime.contract.extra["noise_scheduler"] == "DDPM"
    msg = observation(runtime.config, 3)
    chunk = runtime.infer("robot-a", msg).actions

    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

    reference_config = PreTrainedConfig.from_pretrained(checkpoint, local_files_only=True)
    reference_config.noise_scheduler_type = "DDPM"
    reference_config.num_inference_steps = 10
    reference_config.pretrained_backbone_weights = None
    policy = DiffusionPolicy.from_pretrained(checkpoint, config=reference_config).eval()
    _, _, pre, post = load_lerobot_policy(checkpoint, torch.device("cpu"))
    frame = lerobot_batch(pre, msg)
    # DDPM draws its initial sample and every step's noise from the global generator: seed it as the session.
    torch.manual_seed(session_seed(runtime.config.policy.seed, "robot-a"))
    expected = post(policy.predict_action_chunk(stacked(frame, frame)))[0].numpy()
    np.testing.assert_allclose(chunk, expected, rtol=1e-5, atol=2e-3)


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(1, 1, 0), (3, 1, 1), (5, 1, 2), (3, 2, 1)])
def test_matmul_conv1d_computes_the_same_convolution(kernel: int, stride: int, padding: int) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(24, 40, kernel, stride=stride, padding=padding)
    assert MatmulConv1d.convertible(conv)
    x = torch.randn(1, 24, 16)
    np.testing.assert_allclose(MatmulConv1d(conv)(x).detach().numpy(), conv(x).detach().numpy(), rtol=1e-4,
                               atol=1e-5)


def test_matmul_conv_transpose1d_computes_the_same_convolution() -> None:
    torch.manual_seed(0)
    conv = torch.nn.ConvTranspose1d(24, 40, 4, stride=2, padding=1)  # LeRobot's UNet upsampling layer
    assert MatmulConvTranspose1d.convertible(conv)
    x = torch.randn(1, 24, 8)
    ours = MatmulConvTranspose1d(conv)(x).detach().numpy()
    assert ours.shape == (1, 40, 16)
    np.testing.assert_allclose(ours, conv(x).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scheduler", ["DDIM", "DDPM"])
def test_fast_unet_stays_close_to_exact(scheduler: str, tiny_checkpoint, tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint("lift", "diffusion")
    exact = make_runtime(tmp_path / "exact", checkpoint, noise_scheduler=scheduler, num_inference_steps=10)
    fast = make_runtime(tmp_path / "fast", checkpoint, noise_scheduler=scheduler, num_inference_steps=10,
                        fast_unet=True)
    assert fast.contract.extra["exact"] is False and exact.contract.extra["exact"] is True
    for seed in (4, 5):  # the second request uses the history and the generator's next draws
        msg = observation(fast.config, seed)
        np.testing.assert_allclose(fast.infer("robot-a", msg).actions, exact.infer("robot-a", msg).actions,
                                   rtol=1e-4, atol=1e-2)


def test_bf16_runs_and_stays_near_fp32(lift_diffusion: PolicyRuntime, tiny_checkpoint, tmp_path: Path) -> None:
    bf16 = make_runtime(tmp_path, tiny_checkpoint("lift", "diffusion"), dtype="bf16", fast_unet=True)
    msg = observation(bf16.config, 9)
    lift_diffusion.reset("robot-a")
    reference = lift_diffusion.infer("robot-a", msg).actions
    chunk = bf16.infer("robot-a", msg).actions
    joint_range = np.array(bf16.config.upper_limits()) - np.array(bf16.config.lower_limits())
    # Untrained weights amplify rounding; bf16 keeps about 3 significant digits per operation.
    assert np.all(np.abs(chunk - reference) <= 0.1 * joint_range)


def test_act_chunk_matches_lerobot_for_two_arms(tiny_checkpoint, tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint("sort", "act")
    runtime = make_runtime(tmp_path, checkpoint, task="sort")
    assert runtime.contract.policy_type == "act"
    assert runtime.contract.n_obs_steps == 1
    assert set(runtime.contract.cameras) == {"front", "left_wrist", "right_wrist"}
    msg = observation(runtime.config, 5)
    chunk = runtime.infer("arm", msg).actions
    assert chunk.shape == (20, 12)
    _, policy, pre, post = load_lerobot_policy(checkpoint, torch.device("cpu"))
    expected = post(policy.predict_action_chunk(lerobot_batch(pre, msg)))[0].numpy()
    np.testing.assert_allclose(chunk, expected, rtol=1e-5, atol=1e-3)


# ------------------------------------------------------------------------------------------------ sessions


def test_sessions_reset_replays_and_failed_requests_leave_history_alone(lift_diffusion: PolicyRuntime) -> None:
    runtime = lift_diffusion
    first, second = observation(runtime.config, 6), observation(runtime.config, 7)
    runtime.reset("robot-b")
    reference = [runtime.infer("robot-b", first).actions, runtime.infer("robot-b", second).actions]
    runtime.reset("robot-b")
    bad = observation(runtime.config, 8)
    bad.arrays["observation.state"] = np.full(6, np.nan, np.float32)
    replay = [runtime.infer("robot-b", first).actions]
    with pytest.raises(ProtocolError):
        runtime.infer("robot-b", bad)
    replay.append(runtime.infer("robot-b", second).actions)
    np.testing.assert_array_equal(replay[0], reference[0])
    np.testing.assert_array_equal(replay[1], reference[1])


def test_session_store_is_a_bounded_lru_with_per_client_seeds() -> None:
    store = SessionStore(max_sessions=2, base_seed=7, history_len=2, device=torch.device("cpu"))
    a, b = store.get("a"), store.get("b")
    assert a.seed != b.seed
    assert a.seed == session_seed(7, "a") != session_seed(8, "a")
    store.get("a")  # "b" is now the least recently used
    store.get("c")
    assert set(store.sessions) == {"a", "c"}
    draw = torch.randn(3, generator=store.get("a").generator)
    store.reset("a")
    np.testing.assert_array_equal(torch.randn(3, generator=store.get("a").generator).numpy(), draw.numpy())


# ------------------------------------------------------------------------------------------------ validation


def _good() -> Message:
    arrays = {f"observation.images.{name}": np.zeros(shape, np.uint8) for name, shape in LIFT_CAMERAS.items()}
    arrays["observation.state"] = np.zeros(6, np.float32)
    return Message(kind="request", meta={"op": "infer", "client": "c", "obs_t": 1.0}, arrays=arrays)


def _without(key: str):
    def change(msg: Message) -> None:
        del msg.arrays[key]
    return change


def _set(key: str, value: np.ndarray):
    def change(msg: Message) -> None:
        msg.arrays[key] = value
    return change


def _meta(key: str, value: object):
    def change(msg: Message) -> None:
        if value is None:
            msg.meta.pop(key)
        else:
            msg.meta[key] = value
    return change


def _jpeg_declared(shape: list[int]):
    def change(msg: Message) -> None:
        msg.arrays["observation.images.front"] = np.zeros(100, np.uint8)
        msg.jpeg.add("observation.images.front")
        msg.jpeg_shapes["observation.images.front"] = (shape[0], shape[1], shape[2])
    return change


BAD_INPUTS = {
    "missing camera": (_without("observation.images.wrist"), "arrays[observation.images.wrist]", "[480, 640, 3]"),
    "wrong image shape": (_set("observation.images.front", np.zeros((240, 320, 3), np.uint8)),
                          "arrays[observation.images.front]", "[480, 640, 3]"),
    "wrong image dtype": (_set("observation.images.front", np.zeros((480, 640, 3), np.float32)),
                          "arrays[observation.images.front]", "uint8"),
    "missing state": (_without("observation.state"), "arrays[observation.state]", "float32 [6]"),
    "wrong state size": (_set("observation.state", np.zeros(12, np.float32)), "arrays[observation.state]",
                         "float32 [6]"),
    "wrong state dtype": (_set("observation.state", np.zeros(6, np.float64)), "arrays[observation.state]",
                          "float32 [6]"),
    "NaN state": (_set("observation.state", np.array([0, 0, np.nan, 0, 0, 0], np.float32)),
                  "arrays[observation.state]", "finite"),
    "inf state": (_set("observation.state", np.array([0, 0, 0, 0, 0, np.inf], np.float32)),
                  "arrays[observation.state]", "finite"),
    "missing obs_t": (_meta("obs_t", None), "meta.obs_t", "seconds"),
    "non-numeric obs_t": (_meta("obs_t", "soon"), "meta.obs_t", "finite"),
    "unknown array": (_set("observation.images.top", np.zeros((480, 640, 3), np.uint8)),
                      "arrays[observation.images.top]", "only the arrays"),
    "jpeg of the wrong size": (_jpeg_declared([240, 320, 3]), "arrays[observation.images.front].shape",
                               "[480, 640, 3]"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_each_bad_input_names_its_field_and_the_expected_value(case: str) -> None:
    change, field, expected = BAD_INPUTS[case]
    msg = _good()
    validate_request(msg, LIFT_CAMERAS, 6)  # the unmodified request passes
    change(msg)
    with pytest.raises(ProtocolError) as info:
        validate_request(msg, LIFT_CAMERAS, 6)
    assert info.value.field == field
    assert expected in info.value.expected


# ------------------------------------------------------------------------------------------------ loading


def _fake_pretrained(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_run_folder_resolves_to_last_or_highest_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _fake_pretrained(run / "checkpoints" / "000002" / "pretrained_model")
    highest = _fake_pretrained(run / "checkpoints" / "000010" / "pretrained_model")
    assert resolve_checkpoint(run) == highest
    assert resolve_checkpoint(run / "checkpoints") == highest
    last = _fake_pretrained(run / "checkpoints" / "last" / "pretrained_model")
    assert resolve_checkpoint(run) == last
    assert resolve_checkpoint(highest) == highest
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="lerobot-train"):
        resolve_checkpoint(tmp_path / "empty")


def test_layout_differences_say_what_differs() -> None:
    lift = load_config(REPO_ROOT / "configs" / "lift.yaml")
    sort = load_config(REPO_ROOT / "configs" / "sort.yaml")
    lift_checkpoint = make_policy_config(lift, "diffusion", "tiny")
    assert layout_differences(lift_checkpoint, lift, {}) == []
    problems = " | ".join(layout_differences(lift_checkpoint, sort, {}))
    assert "checkpoint needs camera 'wrist'" in problems
    assert "config camera 'left_wrist' is not an input" in problems
    assert "state: checkpoint expects [6] values, config has 12" in problems
    assert "action: checkpoint returns [6] values" in problems
    small = load_config(REPO_ROOT / "configs" / "lift.yaml")
    small.cameras["front"].width, small.cameras["front"].height = 320, 240
    problems_small = layout_differences(lift_checkpoint, small, {})
    assert any("camera 'front': checkpoint expects 480x640" in p for p in problems_small)
    renamed = {"state_names": ["a"] * 6}
    assert any("state_names" in p for p in layout_differences(lift_checkpoint, lift, renamed))


def test_transformers_outside_lerobots_pin_is_recognised() -> None:
    from common.lerobot_guard import transformers_outside_lerobot_pin

    assert transformers_outside_lerobot_pin("5.17.0")
    assert transformers_outside_lerobot_pin("4.57.1")
    assert not transformers_outside_lerobot_pin("5.4.0")
    assert not transformers_outside_lerobot_pin("5.5.2")


def test_the_contract_carries_the_checkpoints_dataset_stats_in_robot_units(lift_diffusion: PolicyRuntime) -> None:
    # The tiny checkpoint's stats are synthesised from the config's joint limits (checkpoint maker): the
    # contract must carry exactly those, per joint, for the actuator's units check (issue 16).
    runtime = lift_diffusion
    config = runtime.config
    stats = runtime.contract.to_meta()["stats"]
    assert set(stats) == {"observation.state", "action"}
    for key in stats:
        np.testing.assert_allclose(stats[key]["min"], config.lower_limits())
        np.testing.assert_allclose(stats[key]["max"], config.upper_limits())
        np.testing.assert_allclose(stats[key]["mean"], (np.asarray(config.lower_limits())
                                                        + np.asarray(config.upper_limits())) / 2)
    from common.wire.contract import PolicyContract, units_differences

    assert units_differences(PolicyContract.from_meta(runtime.contract.to_meta()), config) == []
