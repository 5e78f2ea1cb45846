"""CURVE on the policy link: when it is on, the keys tool and key files, and real CURVE sockets that
let an allowed client in while a client without a key, with an unknown key, or expecting another
server gets nothing. The policy node itself with CURVE is covered at the end (real process)."""

from __future__ import annotations

import logging
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import NodeProcess, free_endpoint, wait_for, write_config

import common.wire.curve
from bench.harness import StandInServer
from common.config import ConfigError, curve_keys_for, load_config
from common.tools.keys import main as keys_main
from common.tools.keys import make_key_pair
from common.wire.curve import CurveKeys, is_loopback
from common.wire.policy_client import PolicyClient
from common.wire.protocol import KIND_REPLY, KIND_REQUEST, Message
from common.wire.transport import PeerUnavailable, RemoteError, RequestClient, SocketFactory


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """A server pair, an allowed robot (its public certificate in allowed/), and an intruder pair."""
    paths: dict[str, Path] = {}
    for name in ("server", "robot", "intruder", "impostor"):
        public, secret = make_key_pair(tmp_path / name, name)
        paths[f"{name}.key"], paths[f"{name}.key_secret"] = public, secret
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(paths["robot.key"], allowed)
    paths["allowed"] = allowed
    return paths


def curve_overrides(keys: dict[str, Path], client: str = "robot", server: str = "server") -> list[str]:
    return [f"--policy.server_secret_key_file={keys[f'{server}.key_secret']}",
            f"--policy.allowed_clients_dir={keys['allowed']}",
            f"--policy.server_public_key_file={keys[f'{server}.key']}",
            f"--policy.client_secret_key_file={keys[f'{client}.key_secret']}"]


# ------------------------------------------------------------------------------------------ when
@pytest.mark.parametrize(("endpoint", "loopback"), [
    ("tcp://127.0.0.1:8000", True), ("tcp://127.3.2.1:8000", True), ("tcp://localhost:8000", True),
    ("tcp://[::1]:8000", True), ("ipc:///tmp/x", True), ("inproc://x", True),
    ("tcp://*:8000", False), ("tcp://0.0.0.0:8000", False), ("tcp://10.0.0.2:8000", False),
    ("tcp://gpu-server:8000", False), ("tcp://eth0:8000", False), ("tcp://[::]:8000", False),
    ("tcp://127.0.0.1:9000;10.0.0.2:8000", False),
])
def test_loopback_endpoints(endpoint: str, loopback: bool) -> None:
    assert is_loopback(endpoint) is loopback


def test_curve_is_off_on_loopback_and_on_beyond_it_unless_insecure(tmp_path: Path) -> None:
    path = write_config(tmp_path, "lift")
    assert not load_config(path).policy_curve()  # the demo: no keys needed
    assert curve_keys_for(load_config(path), "server") is None
    for override in ("--policy.bind=tcp://*:8000", "--policy.endpoint=tcp://10.0.0.2:8000",
                     "--policy.server_public_key_file=keys/server.key"):
        assert load_config(path, [override]).policy_curve(), override
        assert not load_config(path, [override, "--insecure=true"]).policy_curve(), override
    exposed = load_config(path, ["--policy.bind=tcp://*:8000"])
    with pytest.raises(ConfigError, match=r"policy.server_secret_key_file.*expected the path of a CURVE secret"):
        curve_keys_for(exposed, "server")
    with pytest.raises(ConfigError, match=r"policy.server_public_key_file"):
        curve_keys_for(exposed, "client")


def test_insecure_logs_a_loud_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(write_config(tmp_path, "lift"), ["--policy.bind=tcp://*:8000", "--insecure=true"])
    with caplog.at_level(logging.WARNING):
        assert curve_keys_for(config, "server") is None
    assert "INSECURE" in caplog.text and "tcp://*:8000" in caplog.text


def test_streams_beyond_loopback_are_refused_unless_insecure(tmp_path: Path) -> None:
    path = write_config(tmp_path, "lift")
    with pytest.raises(ConfigError, match=r"cameras.front.endpoint.*expected a loopback endpoint"):
        load_config(path, ["--cameras.front.endpoint=tcp://*:5551"])
    with pytest.raises(ConfigError, match=r"actuator.control_endpoint"):
        load_config(path, ["--actuator.control_endpoint=tcp://10.1.1.1:5571"])
    assert load_config(path, ["--cameras.front.endpoint=tcp://*:5551", "--insecure=true"]).insecure


# ------------------------------------------------------------------------------------------ key files
def test_keys_tool_writes_a_pair_once(tmp_path: Path) -> None:
    assert keys_main(["--out", str(tmp_path / "k"), "--name", "robot-1"]) == 0
    public, secret = tmp_path / "k" / "robot-1.key", tmp_path / "k" / "robot-1.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    public_key, no_secret = zmq.auth.load_certificate(public)
    same_public, secret_key = zmq.auth.load_certificate(secret)
    assert no_secret is None and same_public == public_key and len(public_key) == len(secret_key) == 40
    before = secret.read_bytes()
    assert keys_main(["--out", str(tmp_path / "k"), "--name", "robot-1"]) == 2  # never overwritten
    assert secret.read_bytes() == before
    assert keys_main(["--out", str(tmp_path / "k"), "--name", "../escape"]) == 2


def test_missing_or_wrong_key_files_name_the_field_and_file(tmp_path: Path, keys: dict[str, Path]) -> None:
    path = write_config(tmp_path, "lift")

    def server_error(*overrides: str) -> str:
        config = load_config(path, [*curve_overrides(keys), *overrides])
        with pytest.raises(ConfigError) as caught:
            curve_keys_for(config, "server")
        return str(caught.value)

    missing = tmp_path / "nowhere.key_secret"
    assert f"policy.server_secret_key_file`: no such file: {missing}" in server_error(
        f"--policy.server_secret_key_file={missing}")
    # A public certificate where the secret one belongs.
    message = server_error(f"--policy.server_secret_key_file={keys['server.key']}")
    assert "policy.server_secret_key_file" in message and f"no secret key in {keys['server.key']}" in message
    garbage = tmp_path / "garbage.key_secret"
    garbage.write_text('curve\n    public-key = "short"\n    secret-key = "short"\n')
    assert "not a 40-character Z85 CURVE key" in server_error(f"--policy.server_secret_key_file={garbage}")
    empty = tmp_path / "empty-allowed"
    empty.mkdir()
    assert "no client public certificates (*.key)" in server_error(f"--policy.allowed_clients_dir={empty}")
    (keys["allowed"] / "broken.key").write_text("not a certificate\n")
    assert f"No public key found in {keys['allowed'] / 'broken.key'}" in server_error()

    client = load_config(path, [*curve_overrides(keys), f"--policy.client_secret_key_file={keys['robot.key']}"])
    with pytest.raises(ConfigError, match=r"policy.client_secret_key_file.*no secret key"):
        curve_keys_for(client, "client")


# ------------------------------------------------------------------------------------------ real sockets
class EchoServer(StandInServer):
    """A CURVE RouterServer in a thread that answers every request: what the policy loop does."""

    def __init__(self, keys: CurveKeys, endpoint: str) -> None:
        self.factory = SocketFactory(zmq.Context(), curve=keys)
        super().__init__(self.factory, endpoint, name="echo")
        self.served: list[str] = []
        self.start()

    def answer(self, request: Message) -> Message:
        self.served.append(request.meta["client"])
        return Message(kind=KIND_REPLY, seq=request.seq, meta={"op": "ping"})

    def close(self, timeout_s: float = 5.0) -> None:
        super().close(timeout_s)
        self.factory.close()


def _client_keys(keys: dict[str, Path], name: str, server: str = "server") -> CurveKeys:
    server_public, _ = zmq.auth.load_certificate(keys[f"{server}.key"])
    public, secret = zmq.auth.load_certificate(keys[f"{name}.key_secret"])
    return CurveKeys(server_public=server_public, client_public=public, client_secret=secret)


def _ping(factory: SocketFactory, endpoint: str, client: str, *, timeout_s: float = 1.0, retries: int = 1) -> bool:
    requests = RequestClient(factory, endpoint, timeout_s=timeout_s, retries=retries)
    try:
        requests.request(Message(kind=KIND_REQUEST, meta={"op": "ping", "client": client}))
        return True
    except PeerUnavailable:
        return False
    finally:
        requests.close()


@pytest.fixture
def echo(keys: dict[str, Path]) -> Iterator[tuple[EchoServer, str]]:
    public, secret = zmq.auth.load_certificate(keys["server.key_secret"])
    endpoint = free_endpoint()
    server = EchoServer(CurveKeys(server_public=public, server_secret=secret,
                                  allowed_clients_dir=str(keys["allowed"])), endpoint)
    yield server, endpoint
    server.close()


def test_only_the_allowed_client_gets_replies(echo, keys, caplog: pytest.LogCaptureFixture) -> None:
    server, endpoint = echo
    caplog.set_level(logging.INFO, logger="armpipe.curve")
    allowed = SocketFactory(zmq.Context(), curve=_client_keys(keys, "robot"))
    assert _ping(allowed, endpoint, "robot", timeout_s=5.0)
    # No key, an unknown key, and the right client key but another server's public key: nothing comes
    # back, however often they retry (each retry is a new handshake).
    assert not _ping(SocketFactory(zmq.Context()), endpoint, "no-key", retries=3)
    assert not _ping(SocketFactory(zmq.Context(), curve=_client_keys(keys, "intruder")), endpoint, "intruder",
                     retries=3)
    assert not _ping(SocketFactory(zmq.Context(), curve=_client_keys(keys, "robot", server="impostor")), endpoint,
                     "wrong-server", retries=2)
    assert _ping(allowed, endpoint, "robot", timeout_s=5.0)  # still served
    assert server.served == ["robot", "robot"]  # the refused never reached the loop

    intruder_key = zmq.auth.load_certificate(keys["intruder.key"])[0].decode()
    wait_for(lambda: "does not decrypt" in caplog.text, timeout_s=5, message=caplog.text)
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused client")]
    assert len(refusals) == len(set(refusals))  # once per peer and reason, though each client retried
    unknown = [m for m in refusals if intruder_key in m]
    assert len(unknown) == 1 and unknown[0].startswith("refused client 127.0.0.1: CURVE key")  # with the address
    # Without CURVE the handshake fails before ZAP (on the server's side, or on the client's, which then
    # hangs up); the address is there when libzmq had not yet closed the connection (on loopback often
    # it has), and the line says which.
    keyless = [m for m in refusals if "does not use CURVE" in m or "hung up during the CURVE handshake" in m]
    assert keyless and all(m.startswith(("refused client 127.0.0.1:", "refused client (address not reported"))
                           for m in keyless)
    assert server.factory.refusals.refused >= 3 + 3 + 2
    assert "client 127.0.0.1 authenticated with CURVE key" in caplog.text


def test_a_key_copied_into_the_allowed_directory_is_let_in(echo, keys, monkeypatch) -> None:
    _, endpoint = echo
    intruder = SocketFactory(zmq.Context(), curve=_client_keys(keys, "intruder"))
    assert not _ping(intruder, endpoint, "intruder", timeout_s=0.5)
    monkeypatch.setattr(common.wire.curve, "RELOAD_ALLOWED_S", 0.0)
    shutil.copy(keys["intruder.key"], keys["allowed"])
    assert _ping(intruder, endpoint, "intruder", timeout_s=1.0, retries=5)


def test_a_keyless_client_gives_up_in_its_timeout_instead_of_blocking_in_send(echo) -> None:
    """Between refused handshakes libzmq has no pipe to the server, and a REQ send would block forever."""
    _, endpoint = echo
    requests = RequestClient(SocketFactory(zmq.Context()), endpoint, timeout_s=0.3, retries=2)
    outcome: list[BaseException] = []

    def ask() -> None:
        for _ in range(8):
            time.sleep(0.3)  # let the server refuse the handshake and libzmq drop the pipe
            try:
                requests.request(Message(kind=KIND_REQUEST, meta={"op": "ping", "client": "no-key"}))
            except BaseException as exc:
                outcome.append(exc)

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    asker.join(25.0)
    assert not asker.is_alive(), "a request blocked in send"
    assert len(outcome) == 8 and all(isinstance(exc, PeerUnavailable) for exc in outcome)
    requests.close()


# ------------------------------------------------------------------------------------------ the policy node
@pytest.mark.parametrize("policy_type", ["diffusion", "smolvla"])
def test_policy_node_with_curve_serves_only_allowed_clients(policy_type, tmp_path, keys, tiny_checkpoint,
                                                            node_processes) -> None:
    # A language policy (tiny SmolVLA) too: its instruction rides the encrypted request to LeRobot's task, and a
    # request without one is a named error over CURVE while the node keeps serving.
    path = write_config(tmp_path, "lift", {"policy": {"checkpoint": str(tiny_checkpoint("lift", policy_type)),
                                                      "warmup": 0, "cpu_threads": 1}})
    overrides = curve_overrides(keys)
    node = NodeProcess("policy", path, args=overrides)
    node_processes.append(node.start())
    node.wait_ready(timeout_s=180)
    config = load_config(path, overrides)
    assert "CURVE on: server key" in node.log()
    images = {name: np.zeros((cam.height, cam.width, 3), np.uint8) for name, cam in config.cameras.items()}
    robot = PolicyClient(SocketFactory(curve=curve_keys_for(config, "client")), config.policy.endpoint,
                         client_id="robot", timeout_s=60.0)
    language = robot.metadata().takes_instruction
    assert language is (policy_type == "smolvla")
    instruction = "pick up the red cube" if language else None
    first = robot.infer(images, np.zeros(6, np.float32), obs_t=1.0, instruction=instruction)
    assert first.actions.shape[1] == 6
    if language:
        robot.reset()  # the same session noise again: another instruction gives another chunk
        other = robot.infer(images, np.zeros(6, np.float32), obs_t=1.0, instruction="stack the blue cube")
        assert np.abs(other.actions - first.actions).max() > 1e-3
        with pytest.raises(RemoteError) as refused:
            robot.infer(images, np.zeros(6, np.float32), obs_t=1.5)
        assert refused.value.field == "meta.instruction"
    stranger = PolicyClient(SocketFactory(zmq.Context()), config.policy.endpoint, client_id="stranger", timeout_s=1.0)
    with pytest.raises(PeerUnavailable):
        stranger.ping()
    stranger.close()
    assert robot.infer(images, np.zeros(6, np.float32), obs_t=2.0, instruction=instruction).actions.shape[1] == 6
    robot.close()
    wait_for(lambda: "does not use CURVE" in node.log() or "hung up during the CURVE handshake" in node.log(),
             timeout_s=10, message=node.log()[-2000:])
    assert node.stop() == 0
    assert "refused handshakes" in node.log()


def test_policy_node_exits_2_naming_a_missing_key_file(tmp_path, keys) -> None:
    path = write_config(tmp_path, "lift")
    missing = tmp_path / "server.key_secret"
    node = NodeProcess("policy", path, args=[*curve_overrides(keys), f"--policy.server_secret_key_file={missing}"])
    node.start()
    assert node.proc is not None and node.proc.wait(timeout=120) == 2
    node.stop()
    assert f"policy.server_secret_key_file`: no such file: {missing}" in node.log()


def test_policy_node_beyond_loopback_without_keys_exits_2(tmp_path) -> None:
    path = write_config(tmp_path, "lift")
    node = NodeProcess("policy", path, args=["--policy.bind=tcp://*:8000"])
    node.start()
    assert node.proc is not None and node.proc.wait(timeout=120) == 2
    node.stop()
    assert "policy.server_secret_key_file" in node.log() and "python -m common.tools.keys" in node.log()
