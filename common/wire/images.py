"""JPEG encode/decode for camera frames (OpenCV on the CPU)."""

from __future__ import annotations

import cv2
import numpy as np

from common.wire.protocol import ProtocolError


def encode_jpeg(image_rgb: np.ndarray, quality: int = 90) -> np.ndarray:
    """RGB uint8 HxWx3 -> JPEG bytes as a 1-D uint8 array."""
    ok, payload = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR),
                               [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise ProtocolError("image", "an image OpenCV can JPEG-encode", image_rgb.shape)
    return payload.reshape(-1)


def decode_jpeg(payload: np.ndarray, field: str = "image") -> np.ndarray:
    """JPEG bytes -> RGB uint8 HxWx3; a corrupt payload is a ProtocolError naming ``field``."""
    image = cv2.imdecode(np.asarray(payload, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ProtocolError(field, "a decodable JPEG image", f"{payload.nbytes} undecodable bytes")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
