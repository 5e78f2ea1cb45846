"""The policy server image: built from docker/Dockerfile, its entrypoint answers a client outside.

Opt-in (``ARMPIPE_DOCKER_TEST=1``; minutes, several GB): needs root, ``debootstrap`` and ``podman``, Debian's
mirror and PyPI. ``docker/build-local.sh`` builds the image on a debootstrapped Debian base (no image
registry is needed); ``docker/run-exported.sh`` runs its entrypoint chroot-ed into the exported filesystem
with the host's network, because ``podman run`` cannot start containers in every sandbox. The client is
the project's ``PolicyClient``, outside the chroot.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import REPO_ROOT, free_port, wait_for

from common.supervisor_client import read_readiness
from common.tools.keys import make_key_pair
from common.wire.curve import CurveKeys, load_certificate_file
from common.wire.policy_client import PolicyClient
from common.wire.protocol import KIND_REQUEST, Message
from common.wire.transport import PeerUnavailable, SocketFactory, recv_message, send_message

log = logging.getLogger(__name__)

IMAGE = "localhost/armpipe-policy:test"
IMAGE_UID = 10001  # the image's user (docker/Dockerfile, APP_UID)
WORK = Path(os.environ.get("ARMPIPE_DOCKER_WORK", "/var/tmp/armpipe-docker"))

pytestmark = [
    pytest.mark.skipif(os.environ.get("ARMPIPE_DOCKER_TEST") != "1",
                       reason="builds a multi-GB image for minutes: set ARMPIPE_DOCKER_TEST=1 to run"),
    pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap, podman's chroot build and chroot need root"),
    pytest.mark.skipif(not (shutil.which("podman") and shutil.which("debootstrap")),
                       reason="needs podman and debootstrap (apt-get install podman debootstrap)"),
    pytest.mark.timeout(3600),  # the first build downloads and installs several GB
]


@pytest.fixture(scope="module")
def image() -> str:
    start = time.monotonic()
    subprocess.run([str(REPO_ROOT / "docker" / "build-local.sh"), IMAGE], check=True, timeout=3600)
    size = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", IMAGE], check=True,
                          capture_output=True, text=True).stdout.strip()
    log.warning("built %s in %.0f s (base made or reused, layers cached or not): %.2f GB",
                IMAGE, time.monotonic() - start, int(size) / 1e9)
    return IMAGE


@pytest.fixture(scope="module")
def readable_checkpoint(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny lift checkpoint, readable by the image's non-root user (safetensors writes 0600)."""
    copy = tmp_path_factory.mktemp("docker-ckpt") / "pretrained_model"
    shutil.copytree(tiny_checkpoint("lift"), copy)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    copy.parent.chmod(0o755)
    return copy


def run_exported(image: str, checkpoint: Path, env: dict[str, str], *extra: str,
                 **popen: object) -> subprocess.Popen:
    return subprocess.Popen([str(REPO_ROOT / "docker" / "run-exported.sh"), image, str(WORK / "root-test"),
                             "--checkpoint", str(checkpoint), *extra],
                            env={**os.environ, **env}, **popen)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A key directory as docs/operations.md lays it out for the image: the server's pair, the allowed
    clients (a robot and the health check), the health check's secret; owned by the image's user."""
    directory = tmp_path_factory.mktemp("docker-keys")
    allowed = directory / "allowed_clients"
    allowed.mkdir()
    make_key_pair(directory, "server")
    for name in ("robot-1", "healthcheck"):
        public, _ = make_key_pair(directory, name)
        shutil.copy(public, allowed / public.name)
    for path in [directory, *directory.rglob("*")]:
        os.chown(path, IMAGE_UID, IMAGE_UID)
    directory.parent.chmod(0o755)
    return directory


def client_keys(keys: Path, name: str) -> CurveKeys:
    server_public, _ = load_certificate_file(keys / "server.key", secret=False)
    public, secret = load_certificate_file(keys / f"{name}.key_secret", secret=True)
    return CurveKeys(server_public=server_public, client_public=public, client_secret=secret)


def answers_without_keys(endpoint: str) -> bool:
    """Whether a plain (CURVE-less) client gets any reply to a ping within 2 s. A raw socket with send and
    receive timeouts: the handshake never completes, so a REQ socket's send can block too."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.linger = 0
    sock.sndtimeo = sock.rcvtimeo = 2000
    sock.connect(endpoint)
    try:
        send_message(sock, Message(kind=KIND_REQUEST, src="stranger", meta={"op": "ping", "client": "stranger"}))
        recv_message(sock)
    except zmq.Again:
        return False
    finally:
        sock.close()
    return True


CURVE_ENV = {"CURVE_SECRET_KEY": "/keys/server.key_secret", "CURVE_CLIENTS_DIR": "/keys/allowed_clients",
             "CURVE_HEALTHCHECK_KEY": "/keys/healthcheck.key_secret"}


@pytest.fixture
def server(image: str, readable_checkpoint: Path, keys: Path) -> Iterator[tuple[int, subprocess.Popen]]:
    """The image's entrypoint as compose starts it: every interface (so CURVE on), keys under /keys."""
    port = free_port()
    env = {"TASK": "lift", "MODEL_PATH": "/checkpoint", "HOST": "0.0.0.0", "PORT": str(port), "DEVICE": "cpu",
           **CURVE_ENV}
    proc = run_exported(image, readable_checkpoint, env, "--mount", f"{keys}:/keys")
    try:
        yield port, proc
    finally:
        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends; the script forwards it and unmounts
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_policy_in_the_image_answers_a_chunk_to_a_client_outside(server, image, readable_checkpoint,
                                                                 keys) -> None:
    port, proc = server
    endpoint = f"tcp://127.0.0.1:{port}"
    robot = PolicyClient(SocketFactory(curve=client_keys(keys, "robot-1")), endpoint, client_id="robot-1",
                         timeout_s=2.0)
    try:
        # Exporting the image (first run only) and loading torch take a while: wait for the first ping.
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, f"the entrypoint exited with {proc.returncode} before serving"
            try:
                robot.ping()
                break
            except PeerUnavailable:
                assert time.monotonic() < deadline, "the policy in the image never answered ping"
        contract = robot.metadata()
        assert contract.checkpoint_path == "/checkpoint"  # MODEL_PATH reached --policy.checkpoint
        assert contract.device == "cpu"  # DEVICE reached --policy.device
        images = {name: np.full(shape, 128, np.uint8) for name, shape in contract.cameras.items()}
        reply = robot.infer(images, np.zeros(len(contract.state_names), np.float32), obs_t=time.monotonic())
        assert reply.actions.shape == (contract.chunk_length, len(contract.action_names))
        assert np.isfinite(reply.actions).all()
        # CURVE is on (HOST is every interface and the key paths reached the node): no key, no answer.
        assert not answers_without_keys(endpoint)
        robot.ping()
    finally:
        robot.close()

    # The image's own HEALTHCHECK command, run inside it, pings the serving node with its CURVE key ...
    healthy = run_exported(image, readable_checkpoint, {"PORT": str(port), **CURVE_ENV}, "--mount",
                           f"{keys}:/keys", "--healthcheck")
    assert healthy.wait(timeout=120) == 0
    # ... and fails where nothing listens.
    unhealthy = run_exported(image, readable_checkpoint, {"PORT": str(free_port()), **CURVE_ENV}, "--mount",
                             f"{keys}:/keys", "--healthcheck")
    assert unhealthy.wait(timeout=120) == 1


def test_standby_in_the_image_takes_over_when_the_serving_node_is_killed(image, readable_checkpoint, keys) -> None:
    """STANDBY=1: the entrypoint runs two policy nodes under supervisord (docker/standby.py); a kill -9 of the
    serving one costs a client well under a start, the killed one comes back as the standby, the health
    check passes throughout, and SIGTERM (docker stop) ends the container with 0."""
    port = free_port()
    env = {"TASK": "lift", "MODEL_PATH": "/checkpoint", "HOST": "0.0.0.0", "PORT": str(port), "DEVICE": "cpu",
           "STANDBY": "1", **CURVE_ENV}
    proc = run_exported(image, readable_checkpoint, env, "--mount", f"{keys}:/keys")
    ready_dir = WORK / "root-test" / "app" / "run" / "ready"
    robot = PolicyClient(SocketFactory(curve=client_keys(keys, "robot-1")), f"tcp://127.0.0.1:{port}",
                         client_id="robot-1", timeout_s=5.0, retries=1)

    def serving_and_standby() -> tuple[dict, dict] | None:
        assert proc.poll() is None, f"the entrypoint exited with {proc.returncode}"
        entries = [read_readiness(ready_dir).get(name) for name in ("policy", "policy-standby")]
        roles = {entry["serving"]: entry for entry in entries if entry and entry["alive"]}
        return (roles[True], roles[False]) if len(roles) == 2 else None

    def chunk(images: dict, state: np.ndarray) -> object:
        try:
            return robot.infer(images, state, obs_t=time.monotonic())
        except PeerUnavailable:
            return None

    try:
        serving, standby = wait_for(serving_and_standby, timeout_s=600, interval_s=0.5,
                                    message="the image never ran a serving and a standby policy")
        contract = robot.metadata()
        images = {name: np.full(shape, 128, np.uint8) for name, shape in contract.cameras.items()}
        state = np.zeros(len(contract.state_names), np.float32)
        assert chunk(images, state) is not None
        killed = time.monotonic()
        os.kill(serving["pid"], signal.SIGKILL)
        reply = wait_for(lambda: chunk(images, state), timeout_s=60, message="the standby never served")
        taken_over_s = time.monotonic() - killed
        log.warning("image standby: kill -9 of the serving node to the next chunk: %.2f s", taken_over_s)
        assert reply.actions.shape == (contract.chunk_length, len(contract.action_names))
        assert taken_over_s < 8.0, taken_over_s
        now_serving, now_standby = wait_for(serving_and_standby, timeout_s=300, interval_s=0.5,
                                            message="the killed node never came back as the standby")
        assert now_serving["pid"] == standby["pid"] and now_standby["pid"] != serving["pid"]
        healthy = run_exported(image, readable_checkpoint, {"PORT": str(port), **CURVE_ENV}, "--mount",
                               f"{keys}:/keys", "--healthcheck")
        assert healthy.wait(timeout=120) == 0
    finally:
        robot.close()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    assert code == 0


@pytest.mark.parametrize(("env", "checkpoint_mode", "message"), [
    ({"PORT": "80a"}, 0o644, "PORT: expected a TCP port number"),
    ({"DEVICE": "gpu"}, 0o644, "DEVICE: expected one of cpu, cuda, auto, got 'gpu'"),
    ({"TASK": "juggle"}, 0o644, "no deployment file /app/configs/juggle.yaml"),
    ({}, 0o600, "is not readable by uid 10001"),  # a checkpoint copied as safetensors wrote it
    ({"INSECURE": "maybe"}, 0o644, "INSECURE: expected 1/true or 0/false"),
    ({"CURVE_SECRET_KEY": "/keys/server.key_secret"}, 0o644, "CURVE_SECRET_KEY: no such file or directory"),
    # CURVE on (every interface) without keys: the node itself refuses, naming the field.
    ({"HOST": "0.0.0.0"}, 0o644, "policy.server_secret_key_file"),
    ({"STANDBY": "maybe"}, 0o644, "STANDBY: expected 1/true or 0/false"),
    # The same refusal with a standby: supervisord does not restart it, and the container still exits 2.
    ({"HOST": "0.0.0.0", "STANDBY": "1"}, 0o644, "policy.server_secret_key_file"),
])
def test_entrypoint_refuses_bad_settings_with_exit_2_naming_them(image, readable_checkpoint, tmp_path, env,
                                                                 checkpoint_mode, message) -> None:
    checkpoint = tmp_path / "pretrained_model"
    shutil.copytree(readable_checkpoint, checkpoint)
    (checkpoint / "model.safetensors").chmod(checkpoint_mode)
    tmp_path.chmod(0o755)
    settings = {"TASK": "lift", "MODEL_PATH": "/checkpoint", "HOST": "127.0.0.1", "PORT": "8000",
                "DEVICE": "cpu", **env}
    proc = run_exported(image, checkpoint, settings, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script stops the node and unmounts
        proc.communicate(timeout=60)
        pytest.fail(f"the entrypoint accepted {env} and kept running")
    assert proc.returncode == 2, stderr
    assert message in stderr
