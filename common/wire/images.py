"""JPEG encode/decode for camera frames (OpenCV on the CPU, imported on first use)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.wire.protocol import Message, ProtocolError


@dataclass(frozen=True)
class JpegImage:
    """A frame still in the JPEG bytes it arrived in: passed on as they are, never decoded and re-encoded."""

    payload: np.ndarray  # 1-D uint8: the JPEG file
    shape: tuple[int, int, int]  # (H, W, 3): what it decodes to

    @classmethod
    def of_message(cls, msg: Message, name: str = "image") -> JpegImage:
        """The JPEG array ``name`` of a decoded message (``protocol.decode`` leaves JPEG arrays as bytes)."""
        return cls(payload=msg.arrays[name], shape=msg.jpeg_shapes.get(name, (0, 0, 0)))


def encode_jpeg(image_rgb: np.ndarray, quality: int = 90) -> np.ndarray:
    """RGB uint8 HxWx3 -> JPEG bytes as a 1-D uint8 array."""
    import cv2

    ok, payload = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR),
                               [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise ProtocolError("image", "an image OpenCV can JPEG-encode", image_rgb.shape)
    return payload.reshape(-1)


def decode_jpeg(payload: np.ndarray, field: str = "image") -> np.ndarray:
    """JPEG bytes -> RGB uint8 HxWx3; a corrupt payload is a ProtocolError naming ``field``."""
    import cv2

    image = cv2.imdecode(np.asarray(payload, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ProtocolError(field, "a decodable JPEG image", f"{payload.nbytes} undecodable bytes")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
