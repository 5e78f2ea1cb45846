"""Door 1 of issue 24: openpi clients get chunks from armpipe's policy node through nodes.openpi_gateway.

Real processes throughout: the policy node serves a tiny real ACT checkpoint (the project's checkpoint
maker; ACT is deterministic, so a chunk through the gateway can be compared with one asked for directly),
the gateway runs as ``python -m nodes.openpi_gateway``, and the client is
``openpi-client`` 0.1.2's ``WebsocketClientPolicy`` as installed from PyPI. Also both doors at once (the actuator
with ``policy.backend: openpi`` through the gateway, driving emulated servos) and the server role under
supervisord with the gateway enabled.

Beyond loopback: the gateway listens on 0.0.0.0 (beyond loopback by its config) with a self-signed certificate
made by ``openssl`` and an API key; the test's clients reach it through 127.0.0.1, so no traffic leaves.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import websockets.exceptions
import websockets.sync.client
import yaml
from conftest import NodeProcess, free_port, wait_for, write_config
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from test_actuator import EventTap, SensorFeed, control, ready_detail, start_actuator

from common.config import DeploymentConfig, load_config
from common.refusal import EXIT_REFUSED
from common.wire.policy_client import PolicyClient
from common.wire.transport import SocketFactory
from nodes.actuator.openpi_client import OpenpiPolicyClient

# openpi-client 0.1.2 opens its connection without a context manager; websockets 15 warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")

H, W = 48, 64
LIBERO_KEYS = {"observation/image": "front", "observation/wrist_image": "wrist"}


def small_overrides(**extra: Any) -> dict[str, Any]:
    overrides: dict[str, Any] = {
        "cameras": {name: {"width": W, "height": H} for name in ("front", "wrist")},
        "policy": {"warmup": 0, "num_inference_steps": 2, "cpu_threads": 1, "timeout_s": 10.0},
    }
    for key, value in extra.items():
        overrides[key] = {**overrides.get(key, {}), **value}
    return overrides


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, DeploymentConfig]]:
    """One policy node for the module (a tiny real ACT policy at 64x48), and its config."""
    from common.tools.checkpoint_maker import build_checkpoint

    work = tmp_path_factory.mktemp("openpi-gateway")
    config_path = write_config(work, "lift", small_overrides())
    checkpoint = build_checkpoint(load_config(config_path), work / "ckpt", policy_type="act", size="tiny")
    config_path = write_config(work, "lift", small_overrides(policy={"checkpoint": str(checkpoint)}))
    policy = NodeProcess("policy", config_path).start()
    try:
        policy.wait_ready(180)
        yield config_path, load_config(config_path)
    finally:
        policy.stop()


def gateway_config(served: tuple[Path, DeploymentConfig], tmp_path: Path, **gateway: Any) -> Path:
    """The served config with a gateway section on a free port, written next to the test's own run dir."""
    raw = yaml.safe_load(served[0].read_text())
    raw["openpi"] = {"gateway": {"port": free_port(), "flat": {"images": LIBERO_KEYS}, **gateway}}
    raw["run_dir"] = str(tmp_path / "run")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def start_gateway(node_processes: list[NodeProcess], config_path: Path, *args: str) -> NodeProcess:
    gateway = NodeProcess("openpi_gateway", config_path, args=list(args)).start()
    node_processes.append(gateway)
    return gateway


def observation(config: DeploymentConfig, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    images = {name: rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for name in config.cameras}
    state = rng.uniform(-30, 30, len(config.state_names())).astype(np.float32)
    return images, state


def direct_chunk(config: DeploymentConfig, images: dict[str, np.ndarray], state: np.ndarray) -> np.ndarray:
    """The chunk a brand-new session of the policy node gives for this observation over armpipe's wire."""
    client = PolicyClient(SocketFactory(), config.policy.endpoint, timeout_s=10.0)
    try:
        return client.infer(images, state, 1.0).actions
    finally:
        client.close()


def test_nested_layout_gets_the_policy_nodes_chunk(served: tuple[Path, DeploymentConfig], tmp_path: Path,
                                                   node_processes: list[NodeProcess]) -> None:
    config = served[1]
    gateway = start_gateway(node_processes, gateway_config(served, tmp_path)).wait_ready(60)
    port = load_config(gateway.config_path).openpi.gateway.port
    client = WebsocketClientPolicy(host="127.0.0.1", port=port)
    metadata = client.get_server_metadata()
    assert metadata["action_horizon"] == config_chunk(served) and metadata["action_dim"] == 6
    assert metadata["armpipe_contract"]["state_names"] == config.state_names()
    assert metadata["layouts"]["nested"]["images"] == {"front": "front", "wrist": "wrist"}
    images, state = observation(config)
    # The seed's env_client observation: {"images": {camera: HxWx3 uint8}, "states": {arm: joints}}.
    reply = client.infer({"images": images, "states": {"main": state}})
    actions = reply["actions"]
    assert actions.dtype == np.float32 and actions.shape == (config_chunk(served), 6)
    assert reply["server_timing"]["infer_ms"] > 0
    # The policy node's chunk for this observation, bit for bit.
    np.testing.assert_array_equal(actions, direct_chunk(config, images, state))
    second = client.infer({"images": images, "states": {"main": state}})
    assert second["actions"].shape == actions.shape and "prev_total_ms" in second["server_timing"]
    # A 3xHxW image (the seed's env_client and openpi's ALOHA send them so) is taken as well.
    chw = {name: np.ascontiguousarray(image.transpose(2, 0, 1)) for name, image in images.items()}
    assert client.infer({"images": chw, "states": {"main": state}})["actions"].shape == actions.shape
    # Each connection is its own session of the policy node (its own client id).
    other = WebsocketClientPolicy(host="127.0.0.1", port=port)
    np.testing.assert_array_equal(other.infer({"images": images, "states": {"main": state}})["actions"], actions)
    sessions = {line.split("connection ")[1].split()[0] for line in gateway.log().splitlines() if " opened" in line}
    assert len(sessions) == 2, sessions


def config_chunk(served: tuple[Path, DeploymentConfig]) -> int:
    client = PolicyClient(SocketFactory(), served[1].policy.endpoint, timeout_s=10.0)
    try:
        return client.metadata().chunk_length
    finally:
        client.close()


def test_flat_layout_with_a_prompt(served: tuple[Path, DeploymentConfig], tmp_path: Path,
                                   node_processes: list[NodeProcess]) -> None:
    config = served[1]
    gateway = start_gateway(node_processes, gateway_config(served, tmp_path)).wait_ready(60)
    client = WebsocketClientPolicy(host=f"ws://127.0.0.1:{load_config(gateway.config_path).openpi.gateway.port}")
    images, state = observation(config, seed=3)
    # openpi's example client (LIBERO keys), the images mapped by openpi.gateway.flat.images.
    obs = {"observation/image": images["front"], "observation/wrist_image": images["wrist"],
           "observation/state": state, "prompt": "pick up the cube"}
    reply = client.infer(obs)
    assert reply["actions"].shape == (config_chunk(served), 6)
    np.testing.assert_array_equal(reply["actions"], direct_chunk(config, images, state))
    # The prompt is the wire's instruction: bounded as meta.instruction is, named when it is not.
    with pytest.raises(RuntimeError, match="prompt: expected UTF-8 text of at most 512 bytes"):
        client.infer({**obs, "prompt": "x" * 600})


def test_a_wrong_layout_is_refused_with_a_message_and_the_gateway_keeps_serving(
        served: tuple[Path, DeploymentConfig], tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    config = served[1]
    gateway = start_gateway(node_processes, gateway_config(served, tmp_path)).wait_ready(60)
    port = load_config(gateway.config_path).openpi.gateway.port
    images, state = observation(config)
    client = WebsocketClientPolicy(host="127.0.0.1", port=port)
    with pytest.raises(RuntimeError, match="Error in inference server") as refused:
        client.infer({"observation/image": images["front"], "observation/state": state})
    text = str(refused.value)
    assert "missing ['observation/wrist_image']" in text and "nested" in text, text
    with pytest.raises(websockets.exceptions.ConnectionClosed):
        client.infer({"observation/image": images["front"], "observation/state": state})
    # A state of the wrong length names its key and the length it needs.
    client = WebsocketClientPolicy(host="127.0.0.1", port=port)
    with pytest.raises(RuntimeError, match=r"states/main.*6 numbers"):
        client.infer({"images": images, "states": {"main": state[:4]}})
    # The gateway still serves a new connection.
    client = WebsocketClientPolicy(host="127.0.0.1", port=port)
    assert client.infer({"images": images, "states": {"main": state}})["actions"].shape[1] == 6


def test_an_object_array_is_refused_before_numpy_or_pickle_sees_it(
        served: tuple[Path, DeploymentConfig], tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    gateway = start_gateway(node_processes, gateway_config(served, tmp_path)).wait_ready(60)
    port = load_config(gateway.config_path).openpi.gateway.port
    evil = {b"__ndarray__": True, b"data": b"\x80\x04\x95" + b"\x00" * 13, b"dtype": "|O", b"shape": [2]}
    with websockets.sync.client.connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
        ws.recv()  # metadata
        ws.send(msgpack.packb({"images": {"front": evil}, "states": {}}))
        text = ws.recv()
        assert isinstance(text, str) and "images/front.dtype" in text and "'|O'" in text, text
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            ws.recv()
    assert "Traceback" not in gateway.log()


def test_layouts_that_do_not_fit_the_policy_are_refused_at_start(
        served: tuple[Path, DeploymentConfig], tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    config_path = gateway_config(served, tmp_path, flat={"images": {"observation/image": "front"},
                                                         "state": ["observation/state"]})
    gateway = start_gateway(node_processes, config_path)
    assert gateway.proc is not None and gateway.proc.wait(60) == EXIT_REFUSED
    log = gateway.log()
    assert "REFUSED" in log and "openpi.gateway.flat.images" in log and "camera 'wrist'" in log, log[-2000:]


# ----------------------------------------------------------------------------------------------------
# Beyond loopback: TLS and an API key
# ----------------------------------------------------------------------------------------------------


def self_signed(directory: Path, address: str) -> tuple[Path, Path]:
    cert, key = directory / "gateway.crt", directory / "gateway.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    f"/CN={address}", "-addext", f"subjectAltName=IP:{address}", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True)
    return cert, key


def test_beyond_loopback_a_client_without_the_api_key_is_refused(
        served: tuple[Path, DeploymentConfig], tmp_path: Path, node_processes: list[NodeProcess],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The gateway listens on every interface (beyond loopback by its config), and the test's clients reach it
    # through loopback: the traffic never leaves this machine.
    listen, address = "0.0.0.0", "127.0.0.1"
    config = served[1]
    # Without TLS and a key, a gateway listening beyond loopback refuses to start.
    open_gateway = start_gateway(node_processes, gateway_config(served, tmp_path, host=listen))
    assert open_gateway.proc is not None and open_gateway.proc.wait(60) == EXIT_REFUSED
    assert "openpi.gateway.tls_cert_file" in open_gateway.log() and "insecure: true" in open_gateway.log()

    cert, key = self_signed(tmp_path, address)
    (tmp_path / "api.key").write_text("s3cret-key-for-the-test\n")
    secure = tmp_path / "secure"
    secure.mkdir()
    config_path = gateway_config(served, secure, host=listen, tls_cert_file=str(cert), tls_key_file=str(key),
                                 api_key_file=str(tmp_path / "api.key"))
    gateway = start_gateway(node_processes, config_path).wait_ready(60)
    url = f"wss://{address}:{load_config(config_path).openpi.gateway.port}"
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the client trusts the test's self-signed certificate
    with pytest.raises(websockets.exceptions.InvalidStatus, match="401"):
        WebsocketClientPolicy(host=url)
    with pytest.raises(websockets.exceptions.InvalidStatus, match="401"):
        WebsocketClientPolicy(host=url, api_key="wrong-key")
    client = WebsocketClientPolicy(host=url, api_key="s3cret-key-for-the-test")
    images, state = observation(config)
    assert client.infer({"images": images, "states": {"main": state}})["actions"].shape[1] == 6
    assert "missing or wrong API key" in gateway.log()

    # armpipe's robot side over wss: the CA file and the API key from the config (no SSL_CERT_FILE needed).
    monkeypatch.delenv("SSL_CERT_FILE")
    robot = load_config(config_path, ["--policy.backend=openpi", f"--openpi.server.endpoint={url}",
                                      f"--openpi.server.ca_file={cert}", "--openpi.server.layout=nested",
                                      f"--openpi.server.api_key_file={tmp_path / 'api.key'}"])
    robot_client = OpenpiPolicyClient(robot)
    try:
        assert robot_client.metadata().chunk_length == config_chunk(served)
        assert robot_client.infer(images, state, 5.0).actions.shape == (config_chunk(served), 6)
    finally:
        robot_client.close()

    # insecure: true lets it listen in clear beyond loopback, with a loud warning.
    plain = tmp_path / "plain"
    plain.mkdir()
    insecure = start_gateway(node_processes, gateway_config(served, plain, host=listen), "--insecure=true")
    insecure.wait_ready(60)
    assert "INSECURE" in insecure.log() and "without openpi.gateway.tls_cert_file and openpi.gateway.api_key_file" \
        in insecure.log()


# ----------------------------------------------------------------------------------------------------
# Both doors at once: armpipe's robot side (policy.backend: openpi) through the gateway to the policy node
# ----------------------------------------------------------------------------------------------------


def test_the_robot_side_drives_emulated_servos_through_the_gateway(
        served: tuple[Path, DeploymentConfig], tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    config_path = gateway_config(served, tmp_path)
    raw = yaml.safe_load(config_path.read_text())
    raw["policy"]["backend"] = "openpi"
    raw["openpi"]["server"] = {"endpoint": f"ws://127.0.0.1:{raw['openpi']['gateway']['port']}", "layout": "nested"}
    raw["actuator"].update(dry_run=False, max_chunk_age_s=2.0)
    for camera in raw["cameras"].values():
        camera["max_age_s"] = 0.5
    raw["arms"]["main"].update(max_state_age_s=0.5, port=str(tmp_path / "so101_main.tty"),
                               lock_file=str(tmp_path / "bus_main.lock"))
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    config = load_config(config_path)
    start_gateway(node_processes, config_path).wait_ready(60)
    emulator = NodeProcess("servo_emulator", config_path, name="main").start()
    node_processes.append(emulator)
    emulator.wait_ready(60)
    tap = EventTap(config)
    rest = np.asarray(config.arms["main"].rest_pose, np.float32)
    feed = SensorFeed(config, hz=30, position=rest).start()
    try:
        actuator = start_actuator(node_processes, config_path).wait_ready(60)
        # The contract came from the gateway's metadata (its armpipe_contract's chunk length) plus the config.
        assert ready_detail(actuator)["contract"] == "ok", actuator.log()[-2000:]
        control(config, "start")
        acting = tap.wait_action(lambda m: not m.meta["hold"], 60,
                                 message=f"no row executed:\n{actuator.log()[-3000:]}")
        chunk = tap.events("chunk")[0]
        assert chunk.arrays["chunk"].shape == (config_chunk(served), 6)
        assert acting.meta["obs_t"] in {e.meta["obs_t"] for e in tap.events("chunk")}
        # Goals reached the emulated servos (the emulator counts every Goal_Position write).
        stats_path = Path(config.run_dir) / "stats" / "servo_emulator-main.json"

        def goals_written() -> bool:
            if not stats_path.exists():
                return False
            servos = json.loads(stats_path.read_text())["servos"]
            return any(int(servo["max_goal_step"]) > 0 for servo in servos.values())

        wait_for(goals_written, 10, message=f"no goal reached the servos: {stats_path}")
        assert tap.events("latency"), "no goal written to the bus came with a latency event"
    finally:
        feed.close()
        tap.close()


def test_the_server_role_runs_the_gateway_under_supervisord(
        served: tuple[Path, DeploymentConfig], tmp_path: Path) -> None:
    from bench.harness import Supervised

    raw = yaml.safe_load(served[0].read_text())
    port = free_port()
    policy = f"tcp://127.0.0.1:{free_port()}"
    raw["policy"].update(bind=policy, endpoint=policy)
    raw["openpi"] = {"gateway": {"enabled": True, "port": free_port()}}
    raw["run_dir"] = str(tmp_path / "run")
    config_path = tmp_path / "server.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    stack = Supervised("server", "lift", config_path, tmp_path / "supervisor", port).start()
    try:
        stack.wait_all_ready(180)
        assert {proc.full_name for proc in stack.processes()} == {"server:policy", "server:openpi_gateway"}
        client = WebsocketClientPolicy(host="127.0.0.1", port=raw["openpi"]["gateway"]["port"])
        images, state = observation(served[1])
        assert client.infer({"images": images, "states": {"main": state}})["actions"].shape[1] == 6
    finally:
        stack.shutdown()
