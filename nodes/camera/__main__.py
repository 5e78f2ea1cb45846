"""camera: one process per camera, publishing stamped frames.

    python -m nodes.camera --config configs/lift.yaml --name front

Backends (``cameras.<cam>.backend``): ``synthetic`` (moving test pattern), ``opencv`` (UVC/V4L2 through
LeRobot's OpenCVCamera; ``device`` = index or path) and ``realsense`` (LeRobot's RealSenseCamera;
``serial_number``, empty = the only one). See ``nodes.camera.backends``.

Publishes on ``cameras.<cam>.endpoint`` (docs/architecture.md#streams):
- ``frame``: meta ``camera``, ``source: "camera"``, ``backend``; array ``image`` uint8 (H, W, 3) RGB, raw or
  JPEG (``cameras.<cam>.encoding``); ``t`` = capture time on the monotonic clock; ``seq`` increases.
- ``event`` ``camera_stats`` once per second: ``camera``, ``fps`` (achieved over the last second),
  ``dropped`` and ``errors`` (running totals), and ``error`` (the last error text, "" when healthy).

A missing device is logged with the camera's name and how to list devices, and retried every
``cameras.<cam>.retry_s``: the node stays up (not ready) instead of crash-looping under supervisord.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from common.config import CameraConfig
from common.node import Readiness, start_node
from common.wire.protocol import KIND_EVENT, KIND_FRAME, Message
from common.wire.transport import Publisher, SocketFactory
from nodes.camera.backends import CameraBackend, CameraUnavailable, make_backend

log = logging.getLogger(__name__)

STATS_EVERY_S = 1.0
LOG_REPEAT_S = 30.0


class CameraNode:
    """Capture -> stamp -> publish, plus a once-per-second ``camera_stats`` event."""

    def __init__(self, name: str, config: CameraConfig, publisher: Publisher, readiness: Readiness,
                 stop: threading.Event, backend: CameraBackend | None = None) -> None:
        self.name = name
        self.config = config
        self.publisher = publisher
        self.readiness = readiness
        self.stop = stop
        self.backend = backend or make_backend(name, config)
        self.jpeg = {"image"} if config.encoding == "jpeg" else set()
        self.errors = 0
        self.last_error = ""
        self.published = 0
        self._window_start = time.monotonic()
        self._window_frames = 0
        self._last_logged = ("", 0.0)
        # No frame for this long means the device stalled: reopen it.
        self.stall_s = max(2.0, 10.0 / config.fps)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.backend.open()
            except CameraUnavailable as exc:
                self._error(str(exc) + f"; retrying every {self.config.retry_s:g}s")
                self._publish_stats(force=True)
                self.stop.wait(self.config.retry_s)
                continue
            self.last_error = ""
            self.readiness.ready(camera=self.name, backend=self.backend.kind, endpoint=self.config.endpoint,
                                 width=self.config.width, height=self.config.height, fps=self.config.fps,
                                 encoding=self.config.encoding)
            try:
                self._capture_loop()
            except CameraUnavailable as exc:
                self._error(str(exc))
            finally:
                self.readiness.clear()
                self.backend.close()

    def _capture_loop(self) -> None:
        expected = (self.config.height, self.config.width, 3)
        last_frame = time.monotonic()
        while not self.stop.is_set():
            frame = self.backend.read(timeout_s=0.25)
            now = time.monotonic()
            if frame is not None:
                if frame.image.shape != expected or frame.image.dtype.name != "uint8":
                    self._error(f"camera `{self.name}`: frame {frame.image.dtype}{frame.image.shape} from the "
                                f"{self.backend.kind} backend, expected uint8{expected}; frame dropped")
                else:
                    last_frame = now
                    self.publisher.publish(
                        Message(kind=KIND_FRAME, t=frame.t,
                                meta={"camera": self.name, "source": "camera", "backend": self.backend.kind},
                                arrays={"image": frame.image}, jpeg=set(self.jpeg)),
                        jpeg_quality=self.config.jpeg_quality)
                    self.published += 1
                    self._window_frames += 1
            elif now - last_frame > self.stall_s:
                raise CameraUnavailable(f"camera `{self.name}` ({self.backend.kind}): no frame for "
                                        f"{now - last_frame:.1f}s; reopening")
            self._publish_stats()

    def _publish_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        elapsed = now - self._window_start
        if elapsed < STATS_EVERY_S and not force:
            return
        fps = self._window_frames / elapsed if elapsed > 0 else 0.0
        self._window_start, self._window_frames = now, 0
        self.publisher.publish(Message(kind=KIND_EVENT, meta={
            "event": "camera_stats", "camera": self.name, "fps": round(fps, 2),
            "dropped": int(self.backend.dropped), "errors": self.errors, "published": self.published,
            "backend": self.backend.kind, "error": self.last_error}))

    def _error(self, text: str) -> None:
        self.errors += 1
        self.last_error = text
        now = time.monotonic()
        previous, logged_at = self._last_logged
        if text != previous or now - logged_at > LOG_REPEAT_S:
            log.error("%s", text)
            self._last_logged = (text, now)


def main(argv: list[str] | None = None) -> int:
    started = start_node("camera", "camera: capture, stamp and publish one camera's frames", argv,
                         instance_of="camera")
    name, readiness = started.name, started.readiness
    camera = started.config.cameras[name]
    publisher = Publisher(SocketFactory(), camera.endpoint, started.program)
    node = CameraNode(name, camera, publisher, readiness, started.stop)
    log.info("camera %s: %s %dx%d @ %d fps, %s -> %s", name, camera.backend, camera.width, camera.height,
             camera.fps, camera.encoding, camera.endpoint)
    try:
        node.run()
    finally:
        readiness.clear()
        publisher.close()
        log.info("stopped after %d frames (%d dropped, %d errors)", node.published, node.backend.dropped,
                 node.errors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
