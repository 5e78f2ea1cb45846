"""Robot and server as two supervisord instances talking over TCP, as on two machines.

The server (role ``server``: the policy) runs inside its own network namespace, joined to this one by a
veth pair, so the only way the robot side (role ``robot-sim``: synthetic cameras, emulated servos,
state-reader, actuator, recorder, monitor) reaches the policy is the TCP link between the two "hosts".
The link is CURVE-authenticated with keys made by the keys tool (the server's pair, the robot's pair, the
robot's public certificate in the server's allowed-clients directory): the actuator gets chunks, while a
client without a key and one with a key the server does not know get nothing, and the server logs them
with the robot's address. Cutting that link makes the actuator hold; restoring it resumes the pipeline.
Where network namespaces cannot be made (not root, no iproute2), both instances run on loopback (still
with CURVE: keys are configured) and the link-cut part is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import free_port, wait_for, write_config

from bench.harness import ActuatorWatch, Supervised
from common.tools.keys import make_key_pair
from common.wire.curve import CurveKeys
from common.wire.policy_client import PolicyClient
from common.wire.protocol import KIND_REQUEST, Message
from common.wire.transport import PeerUnavailable, RemoteError, RequestClient, SocketFactory

pytestmark = pytest.mark.timeout(1500)

# A small private link used only between this test's own namespaces.
ROBOT_ADDRESS = "10.231.77.1"
SERVER_ADDRESS = "10.231.77.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def server_namespace() -> Iterator[tuple[str, str, str]]:
    """(namespace, address the policy binds, this side's link device), or ("", "127.0.0.1", "") where
    namespaces are unavailable."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        yield "", "127.0.0.1", ""
        return
    suffix = str(os.getpid() % 100000)
    namespace, host_end, ns_end = f"armpipe-srv-{suffix}", f"apr{suffix}", f"aps{suffix}"
    try:
        _ip("netns", "add", namespace)
    except subprocess.CalledProcessError:
        yield "", "127.0.0.1", ""
        return
    try:
        _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        _ip("link", "set", ns_end, "netns", namespace)
        _ip("addr", "add", f"{ROBOT_ADDRESS}/30", "dev", host_end)
        _ip("link", "set", host_end, "up")
        _ip("netns", "exec", namespace, "ip", "addr", "add", f"{SERVER_ADDRESS}/30", "dev", ns_end)
        _ip("netns", "exec", namespace, "ip", "link", "set", ns_end, "up")
        _ip("netns", "exec", namespace, "ip", "link", "set", "lo", "up")
        yield namespace, SERVER_ADDRESS, host_end
    finally:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def two_machines(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint, server_namespace):
    namespace, server_address, link = server_namespace
    tmp = tmp_path_factory.mktemp("two-machines")
    policy_port = free_port()
    robot_supervisor_port = free_port()
    # Keys as docs/operations.md says: a pair per machine, the robot's public certificate in the server's
    # allowed-clients directory, the server's public certificate on the robot.
    keys = tmp / "keys"
    make_key_pair(keys / "server", "server")
    make_key_pair(keys / "robot", "robot")
    (keys / "allowed_clients").mkdir()
    shutil.copy(keys / "robot" / "robot.key", keys / "allowed_clients")
    # One deployment file for both machines, as docs/operations.md describes: the server binds its own
    # address (not loopback: CURVE is on), the robot connects to it.
    config_path = write_config(tmp, "lift", {
        "policy": {"checkpoint": str(tiny_checkpoint("lift", chunk=48)), "timeout_s": 5.0,
                   "bind": f"tcp://{server_address}:{policy_port}",
                   "endpoint": f"tcp://{server_address}:{policy_port}",
                   "server_secret_key_file": str(keys / "server" / "server.key_secret"),
                   "allowed_clients_dir": str(keys / "allowed_clients"),
                   "server_public_key_file": str(keys / "server" / "server.key"),
                   "client_secret_key_file": str(keys / "robot" / "robot.key_secret")},
        "cameras": {"front": {"width": 640, "height": 480}, "wrist": {"width": 640, "height": 480}},
        "monitor": {"supervisor_url": f"http://127.0.0.1:{robot_supervisor_port}/RPC2"},
    })
    server = Supervised("server", "lift", config_path, tmp / "server-run", free_port(), netns=namespace).start()
    robot = Supervised("robot-sim", "lift", config_path, tmp / "robot-run", robot_supervisor_port).start()
    watch = ActuatorWatch(robot.config.actuator.events_endpoint)
    try:
        yield server, robot, watch, link
    finally:
        watch.close()
        robot.shutdown()
        server.shutdown()


def test_robot_and_server_instances_come_up_and_actions_cross_the_link(two_machines):
    server, robot, watch, _ = two_machines
    server.wait_all_ready(timeout_s=300)
    robot.wait_all_ready(timeout_s=300)
    assert [p.name for p in server.processes()] == ["policy"]
    robot_programs = {p.name for p in robot.processes()}
    assert {"camera-front", "camera-wrist", "state_reader-main", "servo_emulator-main", "actuator"} <= robot_programs
    assert "policy" not in robot_programs
    # The robot role does not start episodes by itself: the operator (or the panel's button) does.
    control = RequestClient(SocketFactory(), robot.config.actuator.control_endpoint, timeout_s=5.0, retries=3)
    try:
        reply = wait_for(lambda: _start_episode(control), timeout_s=120, message="actuator never accepted start")
        assert reply.meta.get("op") == "start"
    finally:
        control.close()
    watch.wait_acting(since=0.0, count=10, timeout_s=240)


def test_clients_without_the_key_or_with_an_unknown_key_get_nothing(two_machines, tmp_path: Path) -> None:
    server, robot, watch, _ = two_machines
    config = robot.config
    watch.wait_acting(since=time.monotonic(), count=3, timeout_s=240)
    make_key_pair(tmp_path, "intruder")
    server_public, _ = zmq.auth.load_certificate(config.policy.server_public_key_file)
    intruder_public, intruder_secret = zmq.auth.load_certificate(tmp_path / "intruder.key_secret")
    strangers = {
        "no-key": SocketFactory(zmq.Context()),
        "unknown-key": SocketFactory(zmq.Context(), curve=CurveKeys(server_public=server_public,
                                                                   client_public=intruder_public,
                                                                   client_secret=intruder_secret)),
    }
    image = np.zeros((480, 640, 3), np.uint8)
    for name, factory in strangers.items():
        client = PolicyClient(factory, config.policy.endpoint, client_id=name, timeout_s=2.0, retries=2)
        for call in (client.ping, lambda c=client: c.infer({"front": image, "wrist": image}, np.zeros(6, np.float32),
                                                            obs_t=time.monotonic())):
            with pytest.raises(PeerUnavailable):
                call()
        client.close()
    # The allowed robot kept getting chunks all along.
    watch.wait_acting(since=time.monotonic(), count=10, timeout_s=120)
    assert robot.process("actuator").state == "RUNNING"
    policy_log = server.run_dir / "logs" / "policy.log"
    robot_address = "10.231.77.1" if server.netns else "127.0.0.1"
    wait_for(lambda: intruder_public.decode() in policy_log.read_text(), timeout_s=30,
             message=policy_log.read_text()[-3000:])
    log_text = policy_log.read_text()
    unknown = [line for line in log_text.splitlines() if intruder_public.decode() in line]
    assert len(unknown) == 1 and f"refused client {robot_address}: CURVE key" in unknown[0]  # once, with the address
    assert "does not use CURVE" in log_text or "hung up during the CURVE handshake" in log_text
    assert f"client {robot_address} authenticated with CURVE key" in log_text
    assert "CURVE on: server key" in log_text


def _start_episode(control: RequestClient) -> Message | None:
    """``start`` once the actuator has checked the policy's contract (it refuses before that)."""
    try:
        return control.request(Message(kind=KIND_REQUEST, meta={"op": "start", "client": "test"}))
    except RemoteError:
        return None


def test_cutting_the_link_holds_and_restoring_it_resumes(two_machines):
    _server, robot, watch, link = two_machines
    if not link:
        pytest.skip("network namespaces unavailable: both instances share loopback, no link to cut")
    watch.wait_acting(since=time.monotonic(), count=3, timeout_s=240)
    _ip("link", "set", link, "down")
    cut_at = time.monotonic()
    try:
        time.sleep(10)
        held = watch.ticks_since(cut_at + 6)
        assert held and all(tick.hold for tick in held)
        assert "policy_unreachable" in {tick.hold_reason for tick in held}
        assert robot.process("actuator").state == "RUNNING"
    finally:
        _ip("link", "set", link, "up")
    watch.wait_acting(since=time.monotonic(), count=3, timeout_s=240)
