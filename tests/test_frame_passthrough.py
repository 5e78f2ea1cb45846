"""Frames reach the policy as they came: a JPEG camera's bytes unchanged, a raw camera's frame raw.

Real processes on real sockets: the actuator and the real policy node (tiny checkpoint), with a wire tap
between them (a ROUTER/DEALER relay in the test process) that keeps every infer request exactly as the
policy node receives it. The frames come from publishers in the test process, so the test knows the JPEG
bytes each camera put on the wire.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from conftest import NodeProcess, free_endpoint, wait_for, write_config

from common.config import load_config
from common.wire.images import JpegImage, encode_jpeg
from common.wire.policy_client import PolicyClient
from common.wire.protocol import Message, decode
from common.wire.transport import Publisher, RouterServer, SocketFactory


class WireTap(threading.Thread):
    """Relays REQ clients on ``front`` to the server on ``back``, keeping each request's frames."""

    def __init__(self, front: str, back: str) -> None:
        super().__init__(daemon=True)
        self.context = zmq.Context.instance()
        self.front = self.context.socket(zmq.ROUTER)
        self.front.bind(front)
        self.back = self.context.socket(zmq.DEALER)
        self.back.connect(back)
        self.requests: list[list[bytes]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        while not self.stop.is_set():
            for sock, _ in poller.poll(50):
                frames = sock.recv_multipart()
                if sock is self.front:
                    with self.lock:
                        self.requests.append(frames[frames.index(b"") + 1:])
                    self.back.send_multipart(frames)
                else:
                    self.front.send_multipart(frames)

    def infer_requests(self) -> list[tuple[Message, list[bytes]]]:
        with self.lock:
            raw = list(self.requests)
        decoded = [(decode(frames), frames) for frames in raw]
        return [(msg, frames) for msg, frames in decoded if msg.meta.get("op") == "infer"]

    def close(self) -> None:
        self.stop.set()
        self.join(timeout=2)
        self.front.close(linger=0)
        self.back.close(linger=0)


def _array_spec(frames: list[bytes], name: str) -> tuple[dict[str, Any], bytes]:
    import msgpack

    header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
    spec = next(spec for spec in header["arrays"] if spec["name"] == name)
    return spec, frames[spec["frame"]] if "frame" in spec else b""


def test_a_jpeg_frame_reaches_the_policy_byte_identical_and_a_raw_frame_stays_raw(
        tmp_path: Path, node_processes: list[NodeProcess], tiny_checkpoint: Any) -> None:
    checkpoint = tiny_checkpoint("lift")
    config_path = write_config(tmp_path, "lift", {
        "policy": {"checkpoint": str(checkpoint)},
        "actuator": {"dry_run": True, "auto_start": True},
        # front: JPEG on the wire at quality 55 (not the 90 a re-encode would use); wrist: raw.
        "cameras": {"front": {"encoding": "jpeg", "jpeg_quality": 55}, "wrist": {"encoding": "raw"}}})
    config = load_config(config_path)
    # The policy node binds elsewhere; the actuator talks to the tap on policy.endpoint.
    policy_endpoint = free_endpoint()
    (tmp_path / "policy-side").mkdir()
    policy_path = write_config(tmp_path / "policy-side", "lift", {
        "policy": {"checkpoint": str(checkpoint), "bind": policy_endpoint, "endpoint": policy_endpoint}})
    tap = WireTap(config.policy.endpoint, policy_endpoint)
    tap.start()
    factory = SocketFactory()
    cameras = {name: Publisher(factory, cam.endpoint, f"camera-{name}") for name, cam in config.cameras.items()}
    arm = Publisher(factory, config.arms["main"].state_endpoint, "state_reader-main")
    rng = np.random.default_rng(3)
    sent_jpeg: set[bytes] = set()
    sent_raw: set[bytes] = set()
    stop = threading.Event()

    def feed() -> None:
        while not stop.is_set():
            for name, cam in config.cameras.items():
                image = rng.integers(0, 255, (cam.height, cam.width, 3), dtype=np.uint8)
                if cam.encoding == "jpeg":
                    # What a JPEG camera sends: bytes encoded once, at the camera's quality.
                    jpeg = JpegImage(encode_jpeg(image, cam.jpeg_quality), (cam.height, cam.width, 3))
                    sent_jpeg.add(jpeg.payload.tobytes())
                    msg = Message(kind="frame", meta={"camera": name, "source": "camera"},
                                  arrays={"image": jpeg.payload}, jpeg={"image"}, jpeg_shapes={"image": jpeg.shape})
                else:
                    sent_raw.add(image.tobytes())
                    msg = Message(kind="frame", meta={"camera": name, "source": "camera"}, arrays={"image": image})
                cameras[name].publish(msg)
            arm.publish(Message(kind="state", meta={"arm": "main", "names": config.arms["main"].joint_names(),
                                                    "source": "test"}, arrays={"position": np.zeros(6, np.float32)}))
            stop.wait(1 / 20)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        policy = NodeProcess("policy", policy_path).start()
        node_processes.append(policy)
        policy.wait_ready(180)
        actuator = NodeProcess("actuator", config_path).start()
        node_processes.append(actuator)
        actuator.wait_ready(60)
        requests = wait_for(lambda: tap.infer_requests()[:3] if len(tap.infer_requests()) >= 3 else None, 60,
                            message="the actuator sent no infer requests through the tap")
    finally:
        stop.set()
        feeder.join(timeout=2)
        tap.close()
        for pub in (*cameras.values(), arm):
            pub.close()
    for _msg, frames in requests:
        front_spec, front_bytes = _array_spec(frames, "observation.images.front")
        assert front_spec["enc"] == "jpeg" and front_spec["shape"] == [480, 640, 3]
        assert front_bytes in sent_jpeg, "the JPEG the policy received is not one the camera sent (re-encoded?)"
        wrist_spec, wrist_bytes = _array_spec(frames, "observation.images.wrist")
        assert wrist_spec["enc"] == "raw", "a raw camera went out as JPEG"
        assert wrist_bytes in sent_raw
        assert "_jpeg_shapes" not in _header_meta(frames)


def _header_meta(frames: list[bytes]) -> dict[str, Any]:
    import msgpack

    return msgpack.unpackb(frames[0], raw=False, strict_map_key=False)["meta"]


@pytest.mark.parametrize("quality", [40, 95])
def test_a_raw_frame_of_a_jpeg_camera_is_encoded_once_at_that_cameras_quality(quality: int) -> None:
    """PolicyClient over a real socket to a server in the test process that keeps the request's frames."""
    endpoint = free_endpoint()
    factory = SocketFactory()
    server = RouterServer(factory, endpoint)
    received: list[list[bytes]] = []

    def serve() -> None:
        request = server.receive(10.0)
        assert request is not None
        envelope, frames = request
        received.append([bytes(frame.buffer) for frame in frames])
        server.reply(envelope, Message(kind="reply", seq=decode(frames).seq, meta={"op": "infer", "obs_t": 1.0},
                                       arrays={"action": np.zeros((2, 6), np.float32)}))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = PolicyClient(factory, endpoint, client_id="test", timeout_s=10.0)
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    try:
        client.infer({"front": image, "wrist": image}, np.zeros(6, np.float32), 1.0, jpeg={"front": quality})
    finally:
        thread.join(timeout=10)
        client.close()
        server.close()
    front_spec, front_bytes = _array_spec(received[0], "observation.images.front")
    assert front_spec["enc"] == "jpeg"
    assert front_bytes == encode_jpeg(image, quality).tobytes()
    wrist_spec, wrist_bytes = _array_spec(received[0], "observation.images.wrist")
    assert wrist_spec["enc"] == "raw" and wrist_bytes == image.tobytes()
