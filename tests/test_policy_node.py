"""The policy node as a real process on real sockets: contract, infer, reset, ping, sessions, bad input,
checkpoints from a training run, and refusal of a checkpoint that does not fit the config."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import PYTHON, NodeProcess, wait_for, write_config

from common.config import load_config
from common.wire.contract import contract_differences
from common.wire.policy_client import PolicyClient
from common.wire.protocol import KIND_ERROR, KIND_REQUEST, Message, decode, encode
from common.wire.transport import RemoteError, RequestClient, SocketFactory
from nodes.policy.checkpoint import checkpoint_identity

TIMEOUT_S = 60.0  # generous: this CPU is shared, and the first chunk of a process is the slowest
SMALL = {"width": 64, "height": 48}


def observation(config, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    images = {name: rng.integers(0, 256, (cam.height, cam.width, 3), dtype=np.uint8)
              for name, cam in config.cameras.items()}
    state = rng.uniform(np.array(config.lower_limits()), np.array(config.upper_limits())).astype(np.float32)
    return images, state


def client(config, name: str) -> PolicyClient:
    return PolicyClient(SocketFactory(), config.policy.endpoint, client_id=name, timeout_s=TIMEOUT_S, retries=1)


@pytest.fixture(scope="module")
def lift_node(tiny_checkpoint, tmp_path_factory) -> Iterator[tuple[object, Path]]:
    checkpoint = tiny_checkpoint("lift", "diffusion")
    config_path = write_config(tmp_path_factory.mktemp("policy-node"), "lift",
                               {"policy": {"checkpoint": str(checkpoint), "cpu_threads": 1, "warmup": 1}})
    node = NodeProcess("policy", config_path).start()
    try:
        node.wait_ready(timeout_s=180)
        yield load_config(config_path), checkpoint
    finally:
        assert node.stop() == 0, node.log()[-3000:]  # SIGTERM stops it cleanly


def test_contract_infer_reset_and_ping(lift_node) -> None:
    config, checkpoint = lift_node
    policy = client(config, "robot-1")
    contract = policy.metadata()
    assert contract.policy_type == "diffusion"
    assert contract.cameras == {"front": [480, 640, 3], "wrist": [480, 640, 3]}
    assert contract.state_names == config.state_names() and contract.action_names == config.action_names()
    assert (contract.chunk_length, contract.n_obs_steps, contract.fps) == (8, 2, 30)
    assert contract.untrained is True
    assert contract.checkpoint_id == checkpoint_identity(checkpoint)
    assert contract_differences(contract, config) == []
    assert policy.ping() >= 0.0

    images, state = observation(config, 1)
    reply = policy.infer(images, state, obs_t=1234.5)
    assert reply.actions.shape == (8, 6) and reply.actions.dtype == np.float32
    assert reply.obs_t == 1234.5
    assert set(reply.timings) == {"unpack_s", "decode_s", "queue_s", "preprocess_s", "inference_s", "postprocess_s",
                                  "total_s", "server_s"}
    assert reply.timings["total_s"] >= reply.timings["inference_s"] > 0
    # The server's time covers its stages and fits inside the client's round trip (docs/protocol.md).
    timings = reply.timings
    assert timings["unpack_s"] > 0
    assert timings["server_s"] >= timings["unpack_s"] + timings["total_s"]
    assert timings["server_s"] < reply.round_trip_s
    assert reply.sent_t < reply.received_t and reply.received_t - reply.sent_t == pytest.approx(reply.round_trip_s)
    # MIN_MAX stats from the joint limits and clipped diffusion: robot units inside the limits.
    assert np.all(reply.actions >= np.array(config.lower_limits()) - 1e-3)
    assert np.all(reply.actions <= np.array(config.upper_limits()) + 1e-3)
    policy.reset()
    policy.close()


def test_an_rtc_request_over_the_wire_continues_its_prefix(lift_node) -> None:
    config, _ = lift_node
    policy = client(config, "robot-rtc")
    contract = policy.metadata()
    assert contract.extra["rtc_max_prefix_rows"] == 15 and contract.extra["rows"] == "n_action_steps"
    assert contract.extra["rtc_guide_rows"] == 7
    images, state = observation(config, 11)
    reply = policy.infer(images, state, obs_t=10.0)
    first = reply.actions
    # The reply carries the rest of the prediction (horizon 16 - 1 past row - 8 rows) as guidance rows.
    assert reply.guide is not None and reply.guide.shape == (7, 6) and reply.guide.dtype == np.float32
    # The next observation 2 rows later; 3 rows will run before its reply, 2 more guide it softly.
    prefix = np.ascontiguousarray(first[2:7])
    images, state = observation(config, 12)
    reply = policy.infer(images, state, obs_t=10.0 + 2 / config.fps, rtc_prefix=prefix, rtc_delay_rows=3)
    np.testing.assert_allclose(reply.actions[:3], prefix[:3], rtol=0, atol=1e-3)
    # A prefix wider than the action is refused with the field named; the session keeps serving.
    with pytest.raises(RemoteError) as info:
        policy.infer(images, state, obs_t=11.0, rtc_prefix=np.zeros((3, 7), np.float32), rtc_delay_rows=1)
    assert info.value.field == "arrays[rtc_prefix]"
    assert policy.infer(images, state, obs_t=11.0).actions.shape == (8, 6)
    policy.close()


def test_two_clients_keep_separate_histories(lift_node) -> None:
    config, _ = lift_node
    first, second, other1, other2 = (observation(config, seed) for seed in (11, 12, 13, 14))
    alone = client(config, "robot-a")
    alone.reset()
    reference = [alone.infer(*first, obs_t=1.0).actions, alone.infer(*second, obs_t=2.0).actions]
    alone.reset()  # reset clears the history and restarts the session's noise

    interleaved = client(config, "robot-b")
    replay = [alone.infer(*first, obs_t=1.0).actions]
    interleaved.infer(*other1, obs_t=1.0)
    interleaved.infer(*other2, obs_t=2.0)
    replay.append(alone.infer(*second, obs_t=2.0).actions)
    np.testing.assert_array_equal(replay[0], reference[0])
    np.testing.assert_array_equal(replay[1], reference[1])
    alone.close()
    interleaved.close()


def _request(config, name: str, op: str = "infer", **changes: object) -> Message:
    images, state = observation(config, 21)
    arrays = {f"observation.images.{cam}": image for cam, image in images.items()}
    arrays["observation.state"] = state
    msg = Message(kind=KIND_REQUEST, src=name, meta={"op": op, "client": name, "obs_t": 5.0}, arrays=arrays)
    for key, value in changes.items():
        if key == "drop":
            del msg.arrays[value]
        elif key == "meta_drop":
            del msg.meta[value]
        elif key == "meta_set":
            msg.meta.update(value)  # type: ignore[call-overload]
        else:
            msg.arrays[key.replace("__", ".")] = value
    return msg


def test_bad_inputs_get_named_errors_and_the_next_good_request_succeeds(lift_node) -> None:
    config, _ = lift_node
    requests = RequestClient(SocketFactory(), config.policy.endpoint, timeout_s=TIMEOUT_S, retries=1)
    cases = {
        "missing camera": (_request(config, "bad", drop="observation.images.wrist"),
                           "arrays[observation.images.wrist]"),
        "wrong image shape": (_request(config, "bad", observation__images__front=np.zeros((48, 64, 3), np.uint8)),
                              "arrays[observation.images.front]"),
        "wrong image dtype": (_request(config, "bad", observation__images__front=np.zeros((480, 640, 3), np.uint16)),
                              "arrays[observation.images.front]"),
        "NaN state": (_request(config, "bad", observation__state=np.array([0, np.nan, 0, 0, 0, 0], np.float32)),
                      "arrays[observation.state]"),
        "inf state": (_request(config, "bad", observation__state=np.array([0, 0, 0, 0, 0, -np.inf], np.float32)),
                      "arrays[observation.state]"),
        "wrong state size": (_request(config, "bad", observation__state=np.zeros(5, np.float32)),
                             "arrays[observation.state]"),
        "wrong state dtype": (_request(config, "bad", observation__state=np.zeros(6, np.float64)),
                              "arrays[observation.state]"),
        "missing obs_t": (_request(config, "bad", meta_drop="obs_t"), "meta.obs_t"),
        "control op sent to the policy": (_request(config, "bad", op="start"), "meta.op"),
        "instruction not a string": (_request(config, "bad", meta_set={"instruction": 7}), "meta.instruction"),
        "instruction as bytes": (_request(config, "bad", meta_set={"instruction": b"lift"}), "meta.instruction"),
        "empty instruction": (_request(config, "bad", meta_set={"instruction": ""}), "meta.instruction"),
        "blank instruction": (_request(config, "bad", meta_set={"instruction": "  \n"}), "meta.instruction"),
        "instruction over 512 bytes": (_request(config, "bad", meta_set={"instruction": "é" * 257}),
                                       "meta.instruction"),
    }
    good = client(config, "good")
    for case, (msg, field) in cases.items():
        with pytest.raises(RemoteError) as info:
            requests.request(msg)
        assert info.value.field == field, case
        assert info.value.expected, case
        assert good.infer(*observation(config, 22), obs_t=3.0).actions.shape == (8, 6), case

    # A corrupt JPEG: the header is fine, the bytes are not.
    jpeg_request = _request(config, "bad")
    jpeg_request.jpeg = {"observation.images.front"}
    frames = encode(jpeg_request)
    frames[1] = np.frombuffer(b"\xff\xd8 definitely not a jpeg " * 10, dtype=np.uint8)
    raw = SocketFactory().socket(zmq.REQ)
    raw.connect(config.policy.endpoint)
    raw.send_multipart(frames, copy=False)
    assert raw.poll(int(TIMEOUT_S * 1000))
    reply = decode(raw.recv_multipart())
    assert reply.kind == KIND_ERROR and reply.meta["field"] == "arrays[observation.images.front]"
    # An instruction whose bytes are not UTF-8 (the header is valid msgpack otherwise) names the field.
    header, *rest = encode(_request(config, "bad", meta_set={"instruction": "pick up QQQQ"}))
    header_bytes = bytes(header)
    assert header_bytes.count(b"QQQQ") == 1
    raw.send_multipart([header_bytes.replace(b"QQQQ", b"\xff\xfe\xc3\x28"), *rest], copy=False)
    assert raw.poll(int(TIMEOUT_S * 1000))
    reply = decode(raw.recv_multipart())
    assert reply.kind == KIND_ERROR and reply.meta["field"] == "meta.instruction", reply.meta
    assert "UTF-8" in reply.meta["expected"]
    # Bytes that are not a message at all still get an error naming the header.
    raw.send_multipart([b"\x93 not msgpack"])
    assert raw.poll(int(TIMEOUT_S * 1000))
    reply = decode(raw.recv_multipart())
    assert reply.kind == KIND_ERROR and reply.meta["field"] == "header"
    raw.close(linger=0)
    assert good.infer(*observation(config, 23), obs_t=4.0).actions.shape == (8, 6)
    # A policy without language (contract.takes_instruction false) takes a valid instruction and ignores it.
    assert good.metadata().takes_instruction is False
    chunks = []
    for instruction in (None, "pick up the red cube"):
        good.reset()
        good.infer(*observation(config, 22), obs_t=3.0)
        chunks.append(good.infer(*observation(config, 24), obs_t=5.0, instruction=instruction).actions)
    plain, told = chunks
    np.testing.assert_array_equal(told, plain)
    requests.close()
    good.close()


def test_jpeg_images_are_decoded_by_the_server(lift_node) -> None:
    config, _ = lift_node
    policy = client(config, "jpeg-robot")
    images, state = observation(config, 31)
    raw_chunk = policy.infer(images, state, obs_t=1.0).actions
    policy.reset()
    reply = policy.infer(images, state, obs_t=1.0, jpeg=True)
    assert reply.actions.shape == (8, 6)
    assert reply.timings["decode_s"] > 0
    # Random-noise images lose detail in JPEG, so the chunk differs a little, not wholesale.
    assert np.all(np.isfinite(reply.actions))
    assert np.abs(reply.actions - raw_chunk).max() < 0.5 * (np.array(config.upper_limits())
                                                           - np.array(config.lower_limits())).max()
    policy.close()


# ------------------------------------------------------------------------------------------------ training runs


def _write_dataset(root: Path, config) -> None:
    """A small LeRobot v3 dataset with the task layout (images 48x64, stored as images, not videos)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    names = config.state_names()
    features = {f"observation.images.{name}": {"dtype": "image", "shape": (cam.height, cam.width, 3),
                                                 "names": ["height", "width", "channels"]}
                for name, cam in config.cameras.items()}
    features["observation.state"] = {"dtype": "float32", "shape": (len(names),), "names": names}
    features["action"] = {"dtype": "float32", "shape": (len(names),), "names": names}
    dataset = LeRobotDataset.create("local/armpipe-policy-test", fps=config.fps, features=features, root=root,
                                    use_videos=False)
    rng = np.random.default_rng(0)
    for _ in range(2):
        for _ in range(12):
            images, state = observation(config, int(rng.integers(1 << 30)))
            frame = {f"observation.images.{name}": image for name, image in images.items()}
            frame.update({"observation.state": state, "action": state + 1.0, "task": "lift"})
            dataset.add_frame(frame)
        dataset.save_episode()
    dataset.finalize()


TINY_TRAIN_POLICY = {"pretrained_backbone_weights": None, "down_dims": (32, 64), "horizon": 16, "n_action_steps": 8,
                     "spatial_softmax_num_keypoints": 16, "diffusion_step_embed_dim": 32, "kernel_size": 3,
                     "noise_scheduler_type": "DDIM", "num_inference_steps": 5}


def _train_two_steps(dataset_root: Path, output: Path) -> None:
    """Two optimisation steps with lerobot-train's own building blocks, written with its own
    ``save_checkpoint`` / ``update_last_checkpoint`` (lerobot-train itself needs ``accelerate``)."""
    import torch
    from lerobot.common.train_utils import get_step_checkpoint_dir, save_checkpoint, update_last_checkpoint
    from lerobot.configs.default import DatasetConfig
    from lerobot.configs.train import TrainPipelineConfig
    from lerobot.datasets.factory import make_dataset
    from lerobot.optim.factory import make_optimizer_and_scheduler
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.factory import make_policy, make_pre_post_processors

    cfg = TrainPipelineConfig(dataset=DatasetConfig(repo_id="local/armpipe-policy-test", root=str(dataset_root)),
                              policy=DiffusionConfig(device="cpu", push_to_hub=False, **TINY_TRAIN_POLICY),
                              output_dir=output, steps=2, batch_size=2, num_workers=0, save_freq=2)
    cfg.validate()
    dataset = make_dataset(cfg)
    policy = make_policy(cfg.policy, ds_meta=dataset.meta)
    preprocessor, postprocessor = make_pre_post_processors(cfg.policy, dataset_stats=dataset.meta.stats)
    optimizer, scheduler = make_optimizer_and_scheduler(cfg, policy)
    policy.train()
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True)
    for _, batch in zip(range(cfg.steps), loader, strict=False):
        for key in dataset.meta.camera_keys:
            if batch[key].dtype == torch.uint8:
                batch[key] = batch[key].float() / 255
        loss, _ = policy.forward(preprocessor(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    checkpoint_dir = get_step_checkpoint_dir(cfg.output_dir, cfg.steps, cfg.steps)
    save_checkpoint(checkpoint_dir=checkpoint_dir, step=cfg.steps, cfg=cfg, policy=policy, optimizer=optimizer,
                    scheduler=scheduler, preprocessor=preprocessor, postprocessor=postprocessor)
    update_last_checkpoint(checkpoint_dir)


def _serve_and_infer(tmp_path: Path, checkpoint: Path) -> None:
    config_path = write_config(tmp_path, "lift", {
        "cameras": {"front": SMALL, "wrist": SMALL},
        "policy": {"checkpoint": str(checkpoint), "cpu_threads": 1, "warmup": 0}})
    config = load_config(config_path)
    with NodeProcess("policy", config_path) as node:
        node.wait_ready(timeout_s=180)
        policy = client(config, "trained")
        contract = policy.metadata()
        assert contract.untrained is False
        assert contract.cameras == {"front": [48, 64, 3], "wrist": [48, 64, 3]}
        assert Path(contract.checkpoint_path).parts[-3:] == ("checkpoints", "last", "pretrained_model")
        reply = policy.infer(*observation(config, 41), obs_t=1.0)
        assert reply.actions.shape == (8, 6)
        assert np.all(np.isfinite(reply.actions))
        policy.close()


def test_a_training_run_folder_loads_its_last_checkpoint_and_serves(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "lift", {"cameras": {"front": SMALL, "wrist": SMALL}}))
    _write_dataset(tmp_path / "dataset", config)
    _train_two_steps(tmp_path / "dataset", tmp_path / "train")
    _serve_and_infer(tmp_path, tmp_path / "train")


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                    reason="lerobot-train needs `accelerate` (the server extra installs it)")
def test_a_lerobot_train_cli_run_loads_and_serves(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "lift", {"cameras": {"front": SMALL, "wrist": SMALL}}))
    _write_dataset(tmp_path / "dataset", config)
    policy_args = [f"--policy.{key}={_cli(value)}" for key, value in TINY_TRAIN_POLICY.items()]
    result = subprocess.run(
        [str(Path(PYTHON).parent / "lerobot-train"), "--dataset.repo_id=local/armpipe-policy-test",
         f"--dataset.root={tmp_path / 'dataset'}", "--policy.type=diffusion", "--policy.device=cpu",
         "--policy.push_to_hub=false", *policy_args, "--steps=2", "--batch_size=2", "--num_workers=0",
         "--save_freq=2", "--wandb.enable=false", f"--output_dir={tmp_path / 'train'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=280,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    _serve_and_infer(tmp_path, tmp_path / "train")


def _cli(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, tuple):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


# ------------------------------------------------------------------------------------------------ refusal


def test_a_checkpoint_that_does_not_fit_the_config_is_refused_with_the_reason(tiny_checkpoint,
                                                                             tmp_path: Path) -> None:
    config_path = write_config(tmp_path, "sort", {"policy": {"checkpoint": str(tiny_checkpoint("lift", "diffusion")),
                                                             "cpu_threads": 1}})
    node = NodeProcess("policy", config_path).start()
    try:
        code = wait_for(lambda: node.proc.poll() is not None, timeout_s=180, message="node did not exit")
        assert code
        assert node.proc.returncode == 2
        log = node.log()
        assert "does not match the config" in log
        assert "config camera 'left_wrist' is not an input of the checkpoint" in log
        assert "state: checkpoint expects [6] values, config has 12" in log
        assert not node.ready_path.exists()
    finally:
        node.stop()
    (tmp_path / "missing").mkdir()
    missing = write_config(tmp_path / "missing", "lift", {"policy": {"checkpoint": str(tmp_path / "nowhere")}})
    node = NodeProcess("policy", missing).start()
    try:
        wait_for(lambda: node.proc.poll() is not None, timeout_s=180, message="node did not exit")
        assert node.proc.returncode == 2
        assert "no such file or directory" in node.log()
    finally:
        node.stop()



def test_capacity_is_logged_once_per_period(caplog: pytest.LogCaptureFixture) -> None:
    from nodes.policy.batching import Capacity

    capacity = Capacity(max_batch=8, period_s=10.0)
    with caplog.at_level("INFO", logger="policy"):
        capacity.add_batch([0.001, 0.003], [0.1, 0.4], failed=0, clients=["robot-1", "robot-2"])
        capacity.add_batch([0.002], [0.2], failed=1, clients=["robot-1"])
        capacity.count(superseded=2)
        capacity.add_busy("model", 4.0)
        capacity.add_busy("socket", 0.5)
        assert capacity.roll(now=capacity.since + 5) is None  # within the period: nothing yet
        assert not caplog.records
        figures = capacity.roll(now=capacity.since + 10)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert message.startswith("3 chunks in 10 s (0.3 chunks/s, 2 sessions): 2 batches, size mean 1.5 max 2 "
                              "(max_batch 8)")
    assert "2 superseded" in message and "1 failed" in message
    assert message.endswith("busy: model thread 40 %, socket thread 5 %")
    assert figures is not None and figures["chunks"] == 3 and figures["batch_max"] == 2 and figures["sessions"] == 2
    assert figures["queue_ms_p50"] == 2.0 and figures["total_ms_max"] == 400.0
    assert figures["model_busy"] == 0.4 and figures["socket_busy"] == 0.05
    assert capacity.last == figures and capacity.sizes == [] and not capacity.clients  # the next period starts empty
