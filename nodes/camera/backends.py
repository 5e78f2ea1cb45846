"""Camera backends for the camera node: synthetic test pattern, OpenCV/V4L2 and Intel RealSense.

Every backend hands out ``CapturedFrame``s: an RGB uint8 (H, W, 3) image stamped with
``time.monotonic()`` at capture, plus a running count of frames the device produced that the node never
got (``dropped``). The OpenCV and RealSense backends are LeRobot's own camera classes
(``lerobot.cameras.opencv.OpenCVCamera``, ``lerobot.cameras.realsense.RealSenseCamera``), whose
background thread keeps the newest frame; the node waits for each new one.

A device that is missing or fails to open raises ``CameraUnavailable`` with a message that names the
camera and says how to list the devices, so that the node can log it and retry.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from common import lerobot_lite
from common.config import CameraConfig

log = logging.getLogger(__name__)

OPENCV_LIST_HINT = "list the cameras with `lerobot-find-cameras opencv` or `v4l2-ctl --list-devices`"
REALSENSE_LIST_HINT = "list the RealSense devices with `rs-enumerate-devices -s` or `lerobot-find-cameras realsense`"


class CameraUnavailable(ConnectionError):
    """The camera's device is missing or cannot be opened; the message says which and how to list devices."""


@dataclass
class CapturedFrame:
    image: np.ndarray  # uint8 (H, W, 3), RGB
    t: float  # time.monotonic() at capture


class CameraBackend(Protocol):
    name: str
    kind: str
    dropped: int

    def open(self) -> None: ...

    def read(self, timeout_s: float) -> CapturedFrame | None:
        """The next new frame, or None if none came within ``timeout_s``."""
        ...

    def close(self) -> None: ...


def make_backend(name: str, config: CameraConfig) -> CameraBackend:
    if config.backend == "synthetic":
        return SyntheticCamera(name, config)
    if config.backend == "opencv":
        return OpenCVBackend(name, config)
    if config.backend == "realsense":
        return RealSenseBackend(name, config)
    raise ValueError(f"cameras.{name}.backend: expected synthetic, opencv or realsense, got {config.backend!r}")


# ---------------------------------------------------------------------------------------------------
# Synthetic
# ---------------------------------------------------------------------------------------------------
def synthetic_pattern(name: str, width: int, height: int) -> np.ndarray:
    """A (H, 2W, 3) pattern, periodic in x with period W: colour bars, a grid and a brightness ramp.

    Each camera's hue is shifted by a hash of its name so that streams are told apart at a glance.
    """
    x = np.arange(2 * width, dtype=np.float32)
    y = np.arange(height, dtype=np.float32)[:, None]
    phase = (zlib.crc32(name.encode()) % 360) / 360.0 * 2 * np.pi
    angle = 2 * np.pi * x / width + phase
    channels = [127.5 + 127.5 * np.sin(angle + shift) for shift in (0.0, 2.1, 4.2)]
    image = np.stack([np.broadcast_to(c, (height, 2 * width)) for c in channels], axis=-1)
    image = image * (0.35 + 0.65 * (y / max(height - 1, 1)))[..., None]
    grid = ((x.astype(np.int64) % 40) < 2)[None, :] | ((np.arange(height) % 40) < 2)[:, None]
    image[grid] = 255.0
    return np.ascontiguousarray(image.astype(np.uint8))


class SyntheticCamera:
    """A moving test pattern produced at the configured fps (precomputed, shifted one step per frame).

    Frames are paced on the monotonic clock; when the node falls more than a frame behind, the missed
    slots are skipped and counted in ``dropped`` (as a real camera's driver would overwrite them).
    """

    kind = "synthetic"

    def __init__(self, name: str, config: CameraConfig, *, shift_px: int = 4) -> None:
        self.name = name
        self.config = config
        self.period = 1.0 / config.fps
        self.shift_px = shift_px
        self.dropped = 0
        self._pattern: np.ndarray | None = None
        self._slot = 0
        self._start = 0.0

    def open(self) -> None:
        self._pattern = synthetic_pattern(self.name, self.config.width, self.config.height)
        self._slot = 0
        self._start = time.monotonic()

    def read(self, timeout_s: float) -> CapturedFrame | None:
        if self._pattern is None:
            raise CameraUnavailable(f"camera `{self.name}` (synthetic): not opened")
        due = self._start + self._slot * self.period
        now = time.monotonic()
        if due - now > timeout_s:
            time.sleep(timeout_s)
            return None
        if due > now:
            time.sleep(due - now)
        else:
            missed = int((now - due) / self.period)
            if missed:
                self.dropped += missed
                self._slot += missed
        t = time.monotonic()
        width = self.config.width
        offset = (self._slot * self.shift_px) % width
        image = np.ascontiguousarray(self._pattern[:, offset:offset + width])
        self._slot += 1
        return CapturedFrame(image=image, t=t)

    def close(self) -> None:
        self._pattern = None


# ---------------------------------------------------------------------------------------------------
# LeRobot cameras (OpenCV, RealSense)
# ---------------------------------------------------------------------------------------------------
class _LeRobotCameraBackend:
    """Shared part: wait for LeRobot's read thread to publish a new frame, take it with its stamp."""

    kind = ""

    def __init__(self, name: str, config: CameraConfig) -> None:
        self.name = name
        self.config = config
        self.dropped = 0
        self.camera: Any = None
        self._last_t: float | None = None
        # LeRobot stamps frames with time.perf_counter(); both are CLOCK_MONOTONIC on Linux, but convert
        # anyway so the stamp is on time.monotonic()'s clock wherever this runs.
        self._clock_offset = 0.0

    def describe(self) -> str:
        raise NotImplementedError

    def _make_camera(self) -> Any:
        raise NotImplementedError

    def _hint(self) -> str:
        raise NotImplementedError

    def open(self) -> None:
        camera = self._make_camera()
        try:
            camera.connect(warmup=True)
        except Exception as exc:  # LeRobot raises ConnectionError, RuntimeError, ValueError, TimeoutError
            raise CameraUnavailable(f"{self.describe()}: cannot open: {exc}; {self._hint()}") from exc
        self.camera = camera
        self._last_t = None
        self._clock_offset = time.monotonic() - time.perf_counter()
        log.info("%s opened (%dx%d @ %d fps)", self.describe(), self.config.width, self.config.height, self.config.fps)

    def read(self, timeout_s: float) -> CapturedFrame | None:
        camera = self.camera
        if camera is None:
            raise CameraUnavailable(f"{self.describe()}: not opened")
        thread = getattr(camera, "thread", None)
        if thread is None or not thread.is_alive():
            raise CameraUnavailable(f"{self.describe()}: the capture thread stopped (device unplugged?); "
                                    f"{self._hint()}")
        if not camera.new_frame_event.wait(timeout=timeout_s):
            return None
        with camera.frame_lock:
            image = getattr(camera, "latest_color_frame", None)
            if image is None:
                image = getattr(camera, "latest_frame", None)
            stamp = camera.latest_timestamp
            camera.new_frame_event.clear()
        if image is None or stamp is None:
            return None
        t = float(stamp) + self._clock_offset
        if self._last_t is not None and self.config.fps > 0:
            gap_periods = (t - self._last_t) * self.config.fps
            if gap_periods > 1.5:
                self.dropped += round(gap_periods) - 1
        self._last_t = t
        return CapturedFrame(image=image, t=t)

    def close(self) -> None:
        camera, self.camera = self.camera, None
        if camera is not None:
            try:
                camera.disconnect()
            except Exception as exc:  # already gone; nothing else to release
                log.debug("%s: disconnect failed: %s", self.describe(), exc)


class OpenCVBackend(_LeRobotCameraBackend):
    """UVC / V4L2 cameras through LeRobot's OpenCVCamera. ``device``: an index ("0") or a path."""

    kind = "opencv"

    def describe(self) -> str:
        return f"camera `{self.name}` (opencv device {self.config.device!r})"

    def _hint(self) -> str:
        return OPENCV_LIST_HINT

    def _index_or_path(self) -> int | str:
        device = self.config.device.strip()
        if not device:
            raise CameraUnavailable(f"{self.describe()}: cameras.{self.name}.device is empty; set it to an index "
                                    f"(\"0\") or a path (/dev/video2); {OPENCV_LIST_HINT}")
        if device.isdigit():
            index = int(device)
            node = f"/dev/video{index}"
            if os.name == "posix" and os.path.isdir("/dev") and not os.path.exists(node):
                raise CameraUnavailable(f"{self.describe()}: no such device {node}; {OPENCV_LIST_HINT}")
            return index
        if not os.path.exists(device):
            raise CameraUnavailable(f"{self.describe()}: no such device {device}; {OPENCV_LIST_HINT}")
        return device

    def _make_camera(self) -> Any:
        index_or_path = self._index_or_path()
        lerobot_lite.install()  # LeRobot's camera modules without torch
        from lerobot.cameras.configs import ColorMode
        from lerobot.cameras.opencv import OpenCVCamera, OpenCVCameraConfig

        return OpenCVCamera(OpenCVCameraConfig(index_or_path=index_or_path, fps=self.config.fps,
                                               width=self.config.width, height=self.config.height,
                                               color_mode=ColorMode.RGB))


class RealSenseBackend(_LeRobotCameraBackend):
    """Intel RealSense colour stream through LeRobot's RealSenseCamera (pyrealsense2)."""

    kind = "realsense"

    def describe(self) -> str:
        serial = self.config.serial_number or "the only connected device"
        return f"camera `{self.name}` (realsense {serial})"

    def _hint(self) -> str:
        return REALSENSE_LIST_HINT

    def _serial_number(self) -> str:
        try:
            import pyrealsense2 as rs
        except ImportError as exc:
            raise CameraUnavailable(f"{self.describe()}: pyrealsense2 is not installed (pip install "
                                    f"'lerobot[intelrealsense]'): {exc}") from exc
        devices = rs.context().query_devices()
        serials = [device.get_info(rs.camera_info.serial_number) for device in devices]
        wanted = self.config.serial_number.strip()
        if not serials:
            raise CameraUnavailable(f"{self.describe()}: no RealSense device found (check the USB 3 cable and "
                                    f"udev rules); {REALSENSE_LIST_HINT}")
        if wanted and wanted not in serials:
            raise CameraUnavailable(f"{self.describe()}: serial number {wanted} not found; connected RealSense "
                                    f"devices: {serials}; {REALSENSE_LIST_HINT}")
        if not wanted and len(serials) > 1:
            raise CameraUnavailable(f"{self.describe()}: {len(serials)} RealSense devices connected {serials}; set "
                                    f"cameras.{self.name}.serial_number to pick one")
        return wanted or serials[0]

    def _make_camera(self) -> Any:
        serial = self._serial_number()
        lerobot_lite.install()  # LeRobot's camera modules without torch
        from lerobot.cameras.configs import ColorMode
        from lerobot.cameras.realsense import RealSenseCamera, RealSenseCameraConfig

        return RealSenseCamera(RealSenseCameraConfig(serial_number_or_name=serial, fps=self.config.fps,
                                                     width=self.config.width, height=self.config.height,
                                                     color_mode=ColorMode.RGB))
