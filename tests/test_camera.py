"""Camera node: real processes publishing real ZeroMQ frames; missing devices keep the node up."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import NodeProcess, wait_for, write_config

from common.config import CameraConfig, load_config
from common.wire.protocol import KIND_EVENT, KIND_FRAME, Message, decode_images
from common.wire.transport import LatestSubscriber, SocketFactory
from nodes.camera.backends import (
    OPENCV_LIST_HINT,
    CameraUnavailable,
    OpenCVBackend,
    RealSenseBackend,
    SyntheticCamera,
    synthetic_pattern,
)

SMALL = {"width": 160, "height": 120, "fps": 30}


def camera_config(tmp_path: Path, **camera: object) -> Path:
    return write_config(tmp_path, "lift", {"cameras": {"front": {**SMALL, **camera}}})


def collect(endpoint: str, until, timeout_s: float = 20.0) -> list[Message]:
    """Subscribe to ``endpoint`` and gather messages until ``until(messages)`` holds."""
    subscriber = LatestSubscriber(SocketFactory(), [endpoint], hwm=1000)
    messages: list[Message] = []
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not until(messages):
            messages += subscriber.poll(0.1)
    finally:
        subscriber.close()
    assert until(messages), f"stream condition not met within {timeout_s}s; got {len(messages)} messages"
    return messages


def frames_of(messages: list[Message]) -> list[Message]:
    return [m for m in messages if m.kind == KIND_FRAME]


def stats_of(messages: list[Message]) -> list[Message]:
    return [m for m in messages if m.kind == KIND_EVENT and m.meta.get("event") == "camera_stats"]


def test_synthetic_camera_publishes_stamped_raw_frames(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    path = camera_config(tmp_path)
    config = load_config(path)
    node = NodeProcess("camera", path, name="front").start()
    node_processes.append(node)
    node.wait_ready()
    started = time.monotonic()
    messages = collect(config.cameras["front"].endpoint,
                       lambda ms: len(frames_of(ms)) >= 20 and len(stats_of(ms)) >= 1)
    frames = frames_of(messages)
    for frame in frames:
        assert frame.meta["camera"] == "front"
        assert frame.meta["source"] == "camera"
        assert frame.meta["backend"] == "synthetic"
        assert frame.src == "camera-front"
        image = frame.arrays["image"]
        assert image.dtype == np.uint8 and image.shape == (120, 160, 3)
    seqs = [f.seq for f in frames]
    stamps = [f.t for f in frames]
    assert all(b > a for a, b in itertools.pairwise(seqs)), seqs
    assert all(b > a for a, b in itertools.pairwise(stamps)), stamps
    # Stamped at capture on this machine's monotonic clock: recent, never in the future.
    assert started - 5.0 < stamps[0] and stamps[-1] <= time.monotonic()
    # The pattern moves.
    assert not np.array_equal(frames[0].arrays["image"], frames[1].arrays["image"])
    stats = stats_of(messages)[-1].meta
    assert stats["camera"] == "front"
    assert {"fps", "dropped", "errors"} <= set(stats)
    assert stats["fps"] > 0 and stats["dropped"] >= 0 and stats["errors"] == 0


def test_synthetic_camera_jpeg_frames_decode_to_the_pattern(tmp_path: Path,
                                                           node_processes: list[NodeProcess]) -> None:
    path = camera_config(tmp_path, encoding="jpeg", jpeg_quality=95)
    config = load_config(path)
    node = NodeProcess("camera", path, name="front").start()
    node_processes.append(node)
    node.wait_ready()
    frames = frames_of(collect(config.cameras["front"].endpoint, lambda ms: len(frames_of(ms)) >= 5))
    pattern = synthetic_pattern("front", 160, 120).astype(np.int16)
    for frame in frames:
        assert "image" in frame.jpeg
        image = decode_images(frame).arrays["image"]
        assert image.shape == (120, 160, 3) and image.dtype == np.uint8
        # Some horizontal shift of the precomputed pattern, within JPEG error.
        errors = [np.abs(image.astype(np.int16) - pattern[:, s:s + 160]).mean() for s in range(0, 160, 4)]
        assert min(errors) < 8.0


def test_missing_opencv_device_keeps_node_up_with_clear_error(tmp_path: Path,
                                                              node_processes: list[NodeProcess]) -> None:
    path = camera_config(tmp_path, backend="opencv", device="/dev/video97", retry_s=0.3)
    config = load_config(path)
    node = NodeProcess("camera", path, name="front").start()
    node_processes.append(node)
    # The node stays up (no crash loop), not ready, and reports the error in its stats events.
    messages = collect(config.cameras["front"].endpoint, lambda ms: len(stats_of(ms)) >= 3)
    errors = [m.meta["errors"] for m in stats_of(messages)]
    assert errors == sorted(errors) and errors[-1] >= 3, errors  # retried, counted
    assert "front" in stats_of(messages)[-1].meta["error"]
    assert node.proc is not None and node.proc.poll() is None
    assert not node.ready_path.exists()
    log = wait_for(lambda: node.log() if "lerobot-find-cameras opencv" in node.log() else "", 10.0)
    assert "camera `front`" in log and "/dev/video97" in log
    assert node.stop() == 0  # SIGTERM while retrying: clean exit


def test_missing_realsense_device_keeps_node_up_with_clear_error(tmp_path: Path,
                                                                 node_processes: list[NodeProcess]) -> None:
    path = camera_config(tmp_path, backend="realsense", serial_number="123456789012", retry_s=0.3)
    config = load_config(path)
    node = NodeProcess("camera", path, name="front").start()
    node_processes.append(node)
    messages = collect(config.cameras["front"].endpoint, lambda ms: len(stats_of(ms)) >= 2)
    last = stats_of(messages)[-1].meta
    assert last["errors"] >= 2 and "realsense" in last["error"]
    assert node.proc is not None and node.proc.poll() is None
    assert not node.ready_path.exists()
    log = wait_for(lambda: node.log() if "rs-enumerate-devices" in node.log() else "", 10.0)
    assert "camera `front`" in log
    assert node.stop() == 0


def test_realsense_backend_error_names_camera_and_listing_command() -> None:
    pytest.importorskip("pyrealsense2")
    import pyrealsense2 as rs

    if len(rs.context().query_devices()):
        pytest.skip("a RealSense device is connected; this test covers the no-device path")
    backend = RealSenseBackend("front", CameraConfig(backend="realsense", serial_number=""))
    with pytest.raises(CameraUnavailable) as raised:
        backend.open()
    text = str(raised.value)
    assert "camera `front`" in text and "no RealSense device" in text and "lerobot-find-cameras realsense" in text


def test_opencv_backend_errors_name_the_device() -> None:
    for device, expected in (("", "device is empty"), ("93", "/dev/video93"), ("/dev/nonexistent-cam", "no such")):
        backend = OpenCVBackend("wrist", CameraConfig(backend="opencv", device=device))
        with pytest.raises(CameraUnavailable) as raised:
            backend.open()
        assert "camera `wrist`" in str(raised.value) and expected in str(raised.value)
        assert OPENCV_LIST_HINT in str(raised.value)


def test_synthetic_backend_counts_skipped_frames_when_reader_is_late() -> None:
    camera = SyntheticCamera("front", CameraConfig(**SMALL))
    camera.open()
    first = camera.read(timeout_s=1.0)
    assert first is not None and camera.dropped == 0
    time.sleep(5 / 30 + 0.02)  # a consumer that stalls for five frame periods
    late = camera.read(timeout_s=1.0)
    assert late is not None and late.t > first.t
    assert camera.dropped >= 4


def test_camera_node_rejects_unknown_name(tmp_path: Path) -> None:
    path = camera_config(tmp_path)
    node = NodeProcess("camera", path, name="nonexistent").start()
    assert node.proc is not None and node.proc.wait(timeout=60) == 2
    assert "--name" in node.log() and "front" in node.log()
    node.stop()

