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
from conftest import REPO_ROOT, free_port

from common.policy_client import PolicyClient
from common.transport import PeerUnavailable, SocketFactory

log = logging.getLogger(__name__)

IMAGE = "localhost/armpipe-policy:test"
WORK = Path(os.environ.get("ARMPIPE_DOCKER_WORK", "/var/tmp/armpipe-docker"))

pytestmark = [
    pytest.mark.skipif(os.environ.get("ARMPIPE_DOCKER_TEST") != "1",
                       reason="builds a multi-GB image for minutes: set ARMPIPE_DOCKER_TEST=1 to run"),
    pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap, podman's chroot build and chroot need root"),
    pytest.mark.skipif(not (shutil.which("podman") and shutil.which("debootstrap")),
                       reason="needs podman and debootstrap (apt-get install podman debootstrap)"),
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


@pytest.fixture
def server(image: str, readable_checkpoint: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    env = {"TASK": "lift", "MODEL_PATH": "/checkpoint", "HOST": "127.0.0.1", "PORT": str(port), "DEVICE": "cpu"}
    proc = run_exported(image, readable_checkpoint, env)
    try:
        yield f"tcp://127.0.0.1:{port}", proc
    finally:
        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends; the script forwards it and unmounts
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_policy_in_the_image_answers_a_chunk_to_a_client_outside(server, image, readable_checkpoint) -> None:
    endpoint, proc = server
    client = PolicyClient(SocketFactory(), endpoint, client_id="outside", timeout_s=2.0)
    try:
        # Exporting the image (first run only) and loading torch take a while: wait for the first ping.
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, f"the entrypoint exited with {proc.returncode} before serving"
            try:
                client.ping()
                break
            except PeerUnavailable:
                assert time.monotonic() < deadline, "the policy in the image never answered ping"
        contract = client.metadata()
        assert contract.checkpoint_path == "/checkpoint"  # MODEL_PATH reached --policy.checkpoint
        assert contract.device == "cpu"  # DEVICE reached --policy.device
        images = {name: np.full(shape, 128, np.uint8) for name, shape in contract.cameras.items()}
        reply = client.infer(images, np.zeros(len(contract.state_names), np.float32), obs_t=time.monotonic())
        assert reply.actions.shape == (contract.chunk_length, len(contract.action_names))
        assert np.isfinite(reply.actions).all()
    finally:
        client.close()

    # The image's own HEALTHCHECK command, run inside it, passes against the serving node ...
    port = endpoint.rsplit(":", 1)[1]
    healthy = run_exported(image, readable_checkpoint, {"PORT": port}, "--healthcheck")
    assert healthy.wait(timeout=120) == 0
    # ... and fails where nothing listens.
    unhealthy = run_exported(image, readable_checkpoint, {"PORT": str(free_port())}, "--healthcheck")
    assert unhealthy.wait(timeout=120) == 1


@pytest.mark.parametrize(("env", "checkpoint_mode", "message"), [
    ({"PORT": "80a"}, 0o644, "PORT: expected a TCP port number"),
    ({"DEVICE": "gpu"}, 0o644, "DEVICE: expected one of cpu, cuda, auto, got 'gpu'"),
    ({"TASK": "juggle"}, 0o644, "no deployment file /app/configs/juggle.yaml"),
    ({}, 0o600, "is not readable by uid 10001"),  # a checkpoint copied as safetensors wrote it
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
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    assert message in stderr
