"""SmolVLA, pi0 and pi0.5 through LeRobot's own classes and saved processors: the instruction reaches LeRobot's
``task``, chunks match LeRobot's plain path, nothing is downloaded (a missing tokenizer is a refusal), and
LeRobot's real-time chunking continues a prefix. The CPU tests use the maker's tiny checkpoints: SmolVLA's sizes
come from its config; pi0 and pi0.5's small Gemma variants are registered with LeRobot by
common/lerobot_pi_sizes.py, which must leave LeRobot's stock sizes exactly as they are (tested here on the meta
device, without building 4 B parameters). The default sizes are served end to end on the GPU machine by
bench/vla_serve.py (bench/device_vla.sh; docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NodeProcess, write_config
from test_policy_runtime import make_runtime, observation

from common.config import load_config
from common.wire.contract import contract_differences
from common.wire.policy_client import PolicyClient
from common.wire.transport import RemoteError, SocketFactory

SMOLVLM_HUB_ID = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
TIMEOUT_S = 120.0


LANGUAGE_TYPES = ("smolvla", "pi0", "pi05")


@pytest.fixture(scope="module")
def smolvla(tiny_checkpoint) -> Path:
    return tiny_checkpoint("lift", "smolvla")


@pytest.fixture(scope="module", params=LANGUAGE_TYPES)
def language_checkpoint(request, tiny_checkpoint) -> Path:
    """Each language policy's tiny checkpoint, built by the maker."""
    return tiny_checkpoint("lift", request.param)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory) -> None:
    # No network and no Hugging Face cache but what a test puts there.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-hf-cache")))


def _with_instruction(msg, text: str | None):
    if text is not None:
        msg.meta["instruction"] = text
    return msg


def test_tiny_language_policies_serve_chunks_that_match_lerobots_plain_path(language_checkpoint: Path,
                                                                          tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, language_checkpoint)
    contract = runtime.contract
    assert contract.policy_type == json.loads((language_checkpoint / "config.json").read_text())["type"]
    assert contract.takes_instruction is True
    assert contract.chunk_length == 50 and contract.extra["rtc_max_prefix_rows"] == 50
    assert contract_differences(contract, runtime.config) == []
    msg = _with_instruction(observation(runtime.config, 1), "pick up the red cube")
    chunk = runtime.infer("robot-a", msg).actions
    assert chunk.shape == (50, 6) and chunk.dtype == np.float32 and np.all(np.isfinite(chunk))

    # LeRobot's plain path on the same observation, instruction and the session's first noise draw.
    policy, pre, post = runtime.policy, runtime.preprocessor, runtime.postprocessor
    raw = {key: torch.from_numpy(np.array(value)).permute(2, 0, 1).float() / 255
           for key, value in msg.arrays.items() if key.startswith("observation.images.")}
    raw["observation.state"] = torch.from_numpy(np.array(msg.arrays["observation.state"]))
    raw["task"] = "pick up the red cube"
    generator = torch.Generator().manual_seed(runtime.sessions.get("robot-a").seed)
    noise = torch.randn(runtime.engine.noise_shape, generator=generator)
    expected = post(policy.predict_action_chunk(pre(raw), noise=noise)).reshape(-1, 6).numpy()
    np.testing.assert_allclose(chunk, expected, rtol=1e-5, atol=1e-4)


def test_the_instruction_reaches_lerobots_task(language_checkpoint: Path, tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, language_checkpoint)
    chunks = {}
    for text in ("pick up the red cube", "stack the blue cube on the green cube", "pick up the red cube"):
        runtime.reset("robot-a")  # the same noise each time
        chunks.setdefault(text, []).append(
            runtime.infer("robot-a", _with_instruction(observation(runtime.config, 3), text)).actions)
    same, other = chunks["pick up the red cube"], chunks["stack the blue cube on the green cube"][0]
    np.testing.assert_array_equal(same[0], same[1])
    assert np.abs(same[0] - other).max() > 1e-3


def test_a_language_policy_refuses_an_infer_without_instruction(smolvla: Path, tmp_path: Path) -> None:
    from common.wire.protocol import ProtocolError

    runtime = make_runtime(tmp_path, smolvla)
    with pytest.raises(ProtocolError) as info:
        runtime.infer("robot-a", observation(runtime.config, 4))
    assert info.value.field == "meta.instruction" and "field is missing" in str(info.value)


def test_rtc_uses_lerobots_real_time_chunking(language_checkpoint: Path, tmp_path: Path) -> None:
    # LeRobot's guidance pulls the new chunk's first rows towards the prefix: much closer than the same request
    # without a prefix (same session noise).
    runtime = make_runtime(tmp_path, language_checkpoint)
    config = runtime.config
    first = runtime.infer("robot-a", _with_instruction(observation(config, 5), "lift the cube")).actions
    prefix = np.ascontiguousarray(first[3:13])
    plain_msg = _with_instruction(observation(config, 6), "lift the cube")
    runtime.reset("robot-b")
    plain = runtime.infer("robot-b", plain_msg).actions
    runtime.reset("robot-b")
    rtc_msg = _with_instruction(observation(config, 6), "lift the cube")
    rtc_msg.arrays["rtc_prefix"] = prefix
    rtc_msg.meta["rtc_delay_rows"] = 4
    guided = runtime.infer("robot-b", rtc_msg).actions
    far = np.abs(plain[:4] - prefix[:4]).mean()
    near = np.abs(guided[:4] - prefix[:4]).mean()
    assert near < 0.5 * far, (near, far)
    # Without a prefix the guidance is off: the plain path exactly.
    runtime.reset("robot-b")
    np.testing.assert_array_equal(runtime.infer("robot-b", plain_msg).actions, plain)


STOCK_SIZES_SCRIPT = """
import importlib, json, sys, torch
from common.lerobot_guard import guard_lerobot_imports
guard_lerobot_imports()
from common import lerobot_pi_sizes
from nodes.policy import lerobot_import

out = {}
for policy_type, model_class, tiny in zip(("pi0", "pi05"), ("PI0Pytorch", "PI05Pytorch"), sys.argv[1:]):
    lerobot_import.policy_class(policy_type)
    modeling_name, configuration_name, config_name = lerobot_pi_sizes.PI_TYPES[policy_type]
    modeling = importlib.import_module(modeling_name)
    config_class = getattr(importlib.import_module(configuration_name), config_name)
    from lerobot.configs.policies import PreTrainedConfig

    def stock():
        # LeRobot's default sizes (gemma_2b + gemma_300m, SigLIP So400m), built on the meta device: no memory.
        config = config_class(device="cpu")
        with torch.device("meta"):
            model = getattr(modeling, model_class)(config)
        pair = model.paligemma_with_expert
        try:
            config_class(paligemma_variant="gemma_7b")
            unknown = "accepted"
        except ValueError as exc:
            unknown = str(exc)
        return {"params": {name: [list(p.shape), str(p.dtype)] for name, p in model.state_dict(keep_vars=True).items()},
                "modules": {name: type(m).__module__ + "." + type(m).__qualname__ for name, m in model.named_modules()},
                "vlm_config": pair.paligemma.config.to_json_string(use_diff=False),
                "expert_config": pair.gemma_expert.config.to_json_string(use_diff=False),
                "variants": {v: vars(modeling.get_gemma_config(v)) for v in ("gemma_2b", "gemma_300m")},
                "config": repr(config), "unknown": unknown}

    try:
        PreTrainedConfig.from_pretrained(tiny, local_files_only=True)
        plain = "loaded"
    except Exception as exc:  # draccus's ParsingError, caused by LeRobot's ValueError
        chain, plain = exc, ""
        while chain is not None:
            plain, chain = plain + f"{type(chain).__name__}: {chain} | ", chain.__cause__ or chain.__context__
    before = stock()
    lerobot_pi_sizes.register(policy_type)
    after = stock()
    registered = PreTrainedConfig.from_pretrained(tiny, local_files_only=True).paligemma_variant
    out[policy_type] = {"before": before, "after": after, "plain": plain, "registered": registered}
print("RESULT " + json.dumps(out))
"""


def test_the_registered_pi_sizes_leave_lerobots_stock_pi0_and_pi05_as_they_are(tiny_checkpoint) -> None:
    # In a fresh process: LeRobot's default-size pi0 / pi0.5 (every parameter's name, shape and dtype, every module's
    # class, the Hugging Face configs of the VLM and the expert, the config and its variant check) is the same before
    # and after common.lerobot_pi_sizes registers its variants; and plain LeRobot, without the registration, refuses
    # a tiny checkpoint at its config, naming the variant the checkpoint records.
    import subprocess
    import sys

    from conftest import REPO_ROOT

    from common.lerobot_pi_sizes import TINY_VLM

    tiny = [str(tiny_checkpoint("lift", policy_type)) for policy_type in ("pi0", "pi05")]
    result = subprocess.run([sys.executable, "-c", STOCK_SIZES_SCRIPT, *tiny], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT ", 1)[1])
    for policy_type in ("pi0", "pi05"):
        before, after = out[policy_type]["before"], out[policy_type]["after"]
        assert len(before["params"]) > 500 and "gemma_2b" in before["config"]
        assert sum(np.prod(shape) for shape, _ in before["params"].values()) > 3e9  # the real 3-4 B architecture
        assert "Invalid paligemma_variant: gemma_7b" in before["unknown"]
        for key in before:
            assert before[key] == after[key], (policy_type, key)
        assert f"Invalid paligemma_variant: {TINY_VLM}" in out[policy_type]["plain"], out[policy_type]["plain"]
        assert out[policy_type]["registered"] == TINY_VLM


def _hub_named_copy(checkpoint: Path, target: Path) -> Path:
    """The tiny checkpoint as a real one reads: vlm_model_name and the tokenizer step name the hub id."""
    shutil.copytree(checkpoint, target)
    shutil.rmtree(target / "vlm")
    config = json.loads((target / "config.json").read_text())
    config["vlm_model_name"] = SMOLVLM_HUB_ID
    config["load_vlm_weights"] = True  # as lerobot/smolvla_base has it: the node never fetches the VLM's weights
    (target / "config.json").write_text(json.dumps(config))
    pre = json.loads((target / "policy_preprocessor.json").read_text())
    for step in pre["steps"]:
        if step["registry_name"] == "tokenizer_processor":
            step["config"]["tokenizer_name"] = SMOLVLM_HUB_ID
    (target / "policy_preprocessor.json").write_text(json.dumps(pre))
    return target


def test_missing_vlm_files_are_refused_with_exit_2_naming_them_and_vlm_dir_serves(smolvla: Path,
                                                                                 tmp_path: Path) -> None:
    checkpoint = _hub_named_copy(smolvla, tmp_path / "hub-named")
    env = {"HF_HUB_CACHE": str(tmp_path / "hf-cache")}
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    config_path = write_config(tmp_path / "a", "lift", {"policy": {"checkpoint": str(checkpoint), "cpu_threads": 1}})
    node = NodeProcess("policy", config_path, env=env).start()
    assert node.proc is not None
    code = node.proc.wait(timeout=TIMEOUT_S)
    node.stop()
    log = node.log()
    assert code == 2, log[-3000:]
    assert f"smolvla needs the config, processor and tokenizer of its VLM '{SMOLVLM_HUB_ID}'" in log
    assert "config.json, processor_config.json" in log and "policy.vlm_dir" in log
    assert "Traceback" not in log

    # The same files in a folder that policy.vlm_dir names, one subfolder per hub id: the node serves.
    vlm_dir = tmp_path / "vlm-assets"
    shutil.copytree(smolvla / "vlm", vlm_dir / SMOLVLM_HUB_ID)
    config_path = write_config(tmp_path / "b", "lift", {"policy": {"checkpoint": str(checkpoint), "cpu_threads": 1,
                                                                    "vlm_dir": str(vlm_dir), "warmup": 1}})
    node = NodeProcess("policy", config_path, env=env).start()
    try:
        node.wait_ready(timeout_s=TIMEOUT_S)
        config = load_config(config_path)
        client = PolicyClient(SocketFactory(), config.policy.endpoint, client_id="robot", timeout_s=TIMEOUT_S)
        contract = client.metadata()
        assert contract.takes_instruction is True and contract.policy_type == "smolvla"
        rng = np.random.default_rng(0)
        images = {name: rng.integers(0, 256, (cam.height, cam.width, 3), dtype=np.uint8)
                  for name, cam in config.cameras.items()}
        state = np.zeros(6, np.float32)
        reply = client.infer(images, state, obs_t=1.0, instruction="pick up the red cube")
        assert reply.actions.shape == (contract.chunk_length, 6)
        with pytest.raises(RemoteError) as info:  # no instruction: a named error, and the node keeps serving
            client.infer(images, state, obs_t=2.0)
        assert info.value.field == "meta.instruction"
        assert client.infer(images, state, obs_t=3.0, instruction="lift").actions.shape == (50, 6)
        client.close()
    finally:
        assert node.stop() == 0, node.log()[-3000:]


def test_missing_paligemma_tokenizer_is_named(smolvla: Path, tmp_path: Path) -> None:
    # pi0 / pi0.5 name the PaliGemma tokenizer in their saved preprocessor; the refusal names it and its files.
    from nodes.policy.vla import LanguageAssetsMissing, resolve_language_assets

    checkpoint = tmp_path / "pi0-like"
    checkpoint.mkdir()
    (checkpoint / "policy_preprocessor.json").write_text(json.dumps(
        {"steps": [{"registry_name": "tokenizer_processor",
                    "config": {"tokenizer_name": "google/paligemma-3b-pt-224"}}]}))
    with pytest.raises(LanguageAssetsMissing) as info:
        resolve_language_assets("pi0", checkpoint, object(), None)
    assert "pi0 needs the tokenizer 'google/paligemma-3b-pt-224' (tokenizer_config.json with tokenizer.json" in str(
        info.value)
    # A Hugging Face cache that holds the tokenizer (as `hf download` leaves it) is found without the network.
    cache = Path(os.environ["HF_HUB_CACHE"]) / "models--google--paligemma-3b-pt-224"
    snapshot = cache / "snapshots" / ("0" * 40)
    shutil.copytree(smolvla / "vlm", snapshot)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("0" * 40)
    assets = resolve_language_assets("pi0", checkpoint, object(), None)
    assert Path(assets.tokenizer) == snapshot


def test_a_maker_checkpoint_copied_elsewhere_finds_its_own_vlm_and_tokenizer_folders(language_checkpoint: Path,
                                                                                     tmp_path: Path) -> None:
    # The maker names its vlm/ (SmolVLA) or tokenizer/ (pi0, pi0.5) by absolute path; on another machine (a copy,
    # a container's mount) that path is gone, and the node takes the folder of that name in the checkpoint itself.
    from nodes.policy.checkpoint import load_lerobot_policy

    copy = tmp_path / "elsewhere" / "pretrained_model"
    shutil.copytree(language_checkpoint, copy)
    gone = "/nonexistent/machine-a/pretrained_model"
    config = json.loads((copy / "config.json").read_text())
    if "vlm_model_name" in config:
        config["vlm_model_name"] = f"{gone}/vlm"
        (copy / "config.json").write_text(json.dumps(config))
    pre = json.loads((copy / "policy_preprocessor.json").read_text())
    for step in pre["steps"]:
        if step["registry_name"] == "tokenizer_processor":
            folder = "vlm" if "vlm_model_name" in config else "tokenizer"
            step["config"]["tokenizer_name"] = f"{gone}/{folder}"
    (copy / "policy_preprocessor.json").write_text(json.dumps(pre))
    policy_config, policy, _, _ = load_lerobot_policy(copy, torch.device("cpu"))
    assert policy_config.type == config["type"] and policy is not None
    runtime = make_runtime(tmp_path / "run", copy)
    chunk = runtime.infer("robot-a", _with_instruction(observation(runtime.config, 1), "lift the cube")).actions
    assert chunk.shape == (50, 6)


def test_offline_eval_sends_each_episodes_task_to_a_language_policy(smolvla: Path, tmp_path: Path) -> None:
    # The predict path of offline_eval against a real SmolVLA node: the dataset's own task string is the
    # instruction (without it every request would be refused on meta.instruction).
    from common.tools.demo_data import DemoSpec, generate_demo_dataset
    from common.tools.offline_eval import evaluate_predictions

    (tmp_path / "base").mkdir()
    base = load_config(write_config(tmp_path / "base", "lift", {}))
    dataset = generate_demo_dataset(base, tmp_path / "lift-demo", DemoSpec(episodes=1, frames=6, codec="h264"))
    (tmp_path / "eval").mkdir()
    config_path = write_config(tmp_path / "eval", "lift", {
        "policy": {"checkpoint": str(smolvla), "timeout_s": 60.0, "cpu_threads": 1},
        "player": {"dataset": str(dataset), "episodes": [0]}})
    node = NodeProcess("policy", config_path).start()
    try:
        node.wait_ready(timeout_s=TIMEOUT_S)
        report, _ = evaluate_predictions(load_config(config_path), episodes=[0])
        assert report.episodes[0].frames == 6 and all(np.isfinite(report.episodes[0].mae))
        assert "meta.instruction" not in node.log()
    finally:
        assert node.stop() == 0, node.log()[-3000:]


def test_lockstep_replay_through_the_actuator(language_checkpoint: Path, tmp_path: Path,
                                             node_processes: list[NodeProcess]) -> None:
    # The dataset player drives the actuator in lockstep through a real policy node serving SmolVLA, pi0 or pi0.5;
    # the actuator sends the dataset's own task (instruction_source: dataset). Two runs of the episode execute the
    # same targets, and no tick is held (a request without instruction would be refused and every tick held).
    from common.tools.demo_data import DemoSpec, generate_demo_dataset
    from common.tools.offline_eval import ExecutedRecorder, evaluate_executed

    frames = 8
    (tmp_path / "base").mkdir()
    dataset = generate_demo_dataset(load_config(write_config(tmp_path / "base", "lift", {})), tmp_path / "lift-demo",
                                    DemoSpec(episodes=1, frames=frames, codec="h264"))
    (tmp_path / "run").mkdir()
    config_path = write_config(tmp_path / "run", "lift", {
        "policy": {"checkpoint": str(language_checkpoint), "timeout_s": 60.0, "cpu_threads": 1},
        "player": {"dataset": str(dataset), "episodes": [0]},
        "actuator": {"instruction": "", "instruction_source": "dataset"},
        "arms": {"main": {"rest_pose": []}},  # lockstep ticks only when the player publishes: no rest move
    })
    common = ["--actuator.lockstep=true", "--actuator.dry_run=true", "--player.mode=lockstep",
              "--player.follow_episodes=true", "--player.loop=true", "--player.episodes=[0]"]
    policy = NodeProcess("policy", config_path).start()
    node_processes.append(policy)
    policy.wait_ready(TIMEOUT_S)
    config = load_config(config_path, common)
    recorder = ExecutedRecorder(config)
    actuator = NodeProcess("actuator", config_path, args=common).start()
    node_processes.append(actuator)
    player = NodeProcess("dataset_player", config_path, args=common).start()
    node_processes.append(player)
    try:
        actuator.wait_ready(180)
        player.wait_ready(180)
        report, traces = evaluate_executed(config, count=2, drive=True, timeout_s=240, recorder=recorder)
    finally:
        recorder.close()
    first, second = report.episodes
    assert first.compared == second.compared == frames, actuator.log()[-3000:]
    assert first.holds == 0 and second.holds == 0 and np.all(np.isfinite(first.mae))
    np.testing.assert_array_equal(traces[0].predicted, traces[1].predicted)
    assert "meta.instruction" not in actuator.log() + policy.log()


def test_a_diffusion_or_act_node_keeps_transformers_out_of_lerobots_import(tiny_checkpoint) -> None:
    # transformers is installed for the language policies; LeRobot would import it (seconds) for any policy. A
    # process serving a DiffusionPolicy keeps it out and still loads; one serving SmolVLA keeps it.
    import subprocess
    import sys

    from conftest import REPO_ROOT

    script = """
import sys, torch
from nodes.policy.checkpoint import keep_unused_transformers_out, load_lerobot_policy, resolve_checkpoint
path = resolve_checkpoint(sys.argv[1])
keep_unused_transformers_out(path)
policy_config = load_lerobot_policy(path, torch.device("cpu"))[0]
print(policy_config.type, sys.modules.get("transformers", "absent") is None)
"""
    for policy_type, hidden in (("diffusion", True), ("smolvla", False)):
        result = subprocess.run([sys.executable, "-c", script, str(tiny_checkpoint("lift", policy_type))],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split()[-2:] == [policy_type, str(hidden)], result.stdout

