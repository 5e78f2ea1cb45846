"""openpi's WebSocket wire, as both of armpipe's doors to it speak it (docs/protocol.md, "openpi's wire").

One WebSocket; the server sends its metadata (a msgpack map) as the first binary message; then each binary
message from the client is one observation (a msgpack map) and the server answers it with one binary message,
a map with ``actions`` (rows x action values) and ``server_timing``. An error is a text message, after which
the server closes the connection. Arrays travel in openpi's numpy encoding (``openpi_client.msgpack_numpy``):
a map ``{"__ndarray__": true, "data": <bytes>, "dtype": "<f4", "shape": [..]}``, scalars as
``{"__npgeneric__": true, "data": <value>, "dtype": ..}``.

Encoding uses openpi's own packer. Decoding never goes through openpi's ``unpack_array``: it builds an array
from whatever dtype string the peer names (``np.dtype("O")`` included), so it is done here, after the plain
msgpack decode, with the dtypes and sizes bounded and each problem named by its key path (``ProtocolError``).
Nothing reaches pickle: msgpack itself never calls it, and object, void, structured and string dtypes are
refused before numpy sees the bytes.

``ObservationKeys`` maps the keys of an observation to armpipe's cameras and state vector, for both layouts:
openpi's flat ``observation/...`` keys, and the seed's nested ``{"images": {...}, "states": {...}}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from openpi_client import msgpack_numpy

from common.config import DeploymentConfig, OpenpiKeys
from common.wire.protocol import MAX_INSTRUCTION_BYTES, ProtocolError

# The dtypes an array may have on this wire (numpy's dtype.str); little-endian or byte-order-free only.
ALLOWED_DTYPES = frozenset({"|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8"})
MAX_ARRAY_BYTES = 256 << 20
MAX_DIMS = 8
MAX_DEPTH = 8

NESTED_IMAGES = "images"
NESTED_STATES = "states"
ACTIONS_KEY = "actions"
TIMING_KEY = "server_timing"
API_KEY_HEADER = "Authorization"
API_KEY_SCHEME = "Api-Key"


def packer() -> msgpack.Packer:
    """openpi's packer (numpy arrays as openpi encodes them; object arrays refused)."""
    return msgpack_numpy.Packer()


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _array(node: dict[Any, Any], path: str) -> np.ndarray | np.generic:
    dtype_text = _text(node.get(b"dtype", node.get("dtype")))
    if not isinstance(dtype_text, str) or dtype_text not in ALLOWED_DTYPES:
        raise ProtocolError(f"{path}.dtype", f"one of {sorted(ALLOWED_DTYPES)} (no object, string or structured "
                                             "arrays)", dtype_text)
    dtype = np.dtype(dtype_text)
    data = node.get(b"data", node.get("data"))
    if b"__npgeneric__" in node or "__npgeneric__" in node:
        if isinstance(data, bool | int | float):
            scalar: np.generic = dtype.type(data)
            return scalar
        raise ProtocolError(f"{path}.data", "a number", type(data).__name__)
    shape = node.get(b"shape", node.get("shape"))
    if not isinstance(shape, list | tuple) or len(shape) > MAX_DIMS or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ProtocolError(f"{path}.shape", f"a list of at most {MAX_DIMS} non-negative sizes", shape)
    if not isinstance(data, bytes):
        raise ProtocolError(f"{path}.data", "bytes", type(data).__name__)
    expected = math.prod(shape) * dtype.itemsize
    if expected > MAX_ARRAY_BYTES or len(data) != expected:
        raise ProtocolError(f"{path}.data", f"{expected} bytes for {dtype_text}{list(shape)} (at most "
                                            f"{MAX_ARRAY_BYTES >> 20} MiB)", f"{len(data)} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _restore(node: Any, path: str, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise ProtocolError(path, f"at most {MAX_DEPTH} levels of nesting")
    if isinstance(node, dict):
        if any(marker in node for marker in (b"__ndarray__", "__ndarray__", b"__npgeneric__", "__npgeneric__")):
            return _array(node, path)
        out: dict[str, Any] = {}
        for key, value in node.items():
            name = _text(key)
            if not isinstance(name, str):
                raise ProtocolError(f"{path}{{key}}", "text keys", key)
            out[name] = _restore(value, f"{path}/{name}" if path else name, depth + 1)
        return out
    if isinstance(node, list):
        return [_restore(value, f"{path}[{index}]", depth + 1) for index, value in enumerate(node)]
    return node


def unpack(data: bytes | bytearray | memoryview, what: str = "message") -> dict[str, Any]:
    """One msgpack map of this wire, its arrays restored (bounded, dtypes allowed above); ``ProtocolError``
    naming the key path otherwise."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types for malformed bytes
        raise ProtocolError(what, "one msgpack map", f"undecodable bytes ({type(exc).__name__}: {exc})") from exc
    if not isinstance(raw, dict):
        raise ProtocolError(what, "a msgpack map", type(raw).__name__)
    restored = _restore(raw, "")
    assert isinstance(restored, dict)
    return restored


# ------------------------------------------------------------------ key layouts


class LayoutError(ProtocolError):
    """An observation in none of the accepted key layouts; its message lists every key (never shortened)."""

    def __init__(self, expected: str, got: str) -> None:
        super().__init__("observation", expected)
        self.got = got
        ValueError.__init__(self, f"observation: expected {expected}; got {got}")


@dataclass(frozen=True)
class ObservationKeys:
    """The keys of one layout: ``images`` observation key -> camera, ``state`` the keys of the state vector
    (one: the whole vector; several: one per arm, in arm order), ``prompt`` the instruction's key."""

    layout: str  # flat | nested
    images: dict[str, str]
    state: list[str]
    state_sizes: list[int]  # values per state key
    prompt: str = "prompt"

    @classmethod
    def from_config(cls, config: DeploymentConfig, layout: str, keys: OpenpiKeys,
                    prompt: str = "prompt") -> ObservationKeys:
        images = dict(keys.images) or {(f"observation/{camera}" if layout == "flat" else camera): camera
                                       for camera in config.cameras}
        state = list(keys.state) or (["observation/state"] if layout == "flat" else list(config.arms))
        total = len(config.state_names())
        sizes = [total] if len(state) == 1 else [len(arm.joint_names()) for arm in config.arms.values()]
        return cls(layout=layout, images=images, state=state, state_sizes=sizes, prompt=prompt)

    def describe(self) -> str:
        """The keys this layout expects, as an example a reader can follow."""
        if self.layout == "flat":
            keys = [*self.images, *self.state]
            return f"flat: {{{', '.join(repr(k) for k in keys)}, {self.prompt!r} (optional)}}"
        return (f"nested: {{'{NESTED_IMAGES}': {{{', '.join(repr(k) for k in self.images)}}}, "
                f"'{NESTED_STATES}': {{{', '.join(repr(k) for k in self.state)}}}, {self.prompt!r} (optional)}}")

    def _sections(self, obs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str, str]:
        if self.layout == "flat":
            return obs, obs, "", ""
        images, states = obs.get(NESTED_IMAGES), obs.get(NESTED_STATES)
        if not isinstance(images, dict):
            raise ProtocolError(NESTED_IMAGES, "a map of camera images (nested layout)", type(images).__name__)
        if not isinstance(states, dict):
            raise ProtocolError(NESTED_STATES, "a map of state vectors (nested layout)", type(states).__name__)
        return images, states, f"{NESTED_IMAGES}/", f"{NESTED_STATES}/"

    def missing(self, obs: dict[str, Any]) -> list[str]:
        """The keys this layout needs that ``obs`` lacks (their paths)."""
        try:
            images, states, image_prefix, state_prefix = self._sections(obs)
        except ProtocolError as exc:
            return [exc.field]
        return ([image_prefix + key for key in self.images if key not in images]
                + [state_prefix + key for key in self.state if key not in states])

    def parse(self, obs: dict[str, Any], shapes: dict[str, list[int]]) -> tuple[dict[str, np.ndarray], np.ndarray,
                                                                                str | None]:
        """``(camera -> uint8 HxWx3 image, float32 state, prompt or None)`` of one observation, each image checked
        against ``shapes`` (camera -> [H, W, 3]; a 3xHxW image is transposed); ``ProtocolError`` naming the key."""
        images_in, states_in, image_prefix, state_prefix = self._sections(obs)
        images: dict[str, np.ndarray] = {}
        for key, camera in self.images.items():
            path = image_prefix + key
            image = images_in.get(key)
            expected = shapes.get(camera)
            if expected is None:
                continue  # a camera the policy does not read
            want = f"uint8 {expected} (HxWx3 RGB, or 3xHxW) for camera '{camera}'"
            if not isinstance(image, np.ndarray):
                raise ProtocolError(path, want, "nothing" if image is None else type(image).__name__)
            if image.ndim == 3 and image.shape[0] == 3 and list(image.shape[1:]) == expected[:2]:
                image = np.ascontiguousarray(image.transpose(1, 2, 0))
            if image.dtype != np.uint8 or list(image.shape) != list(expected):
                raise ProtocolError(path, want, f"{image.dtype}{list(image.shape)}")
            images[camera] = image
        parts = []
        for key, size in zip(self.state, self.state_sizes, strict=True):
            path = state_prefix + key
            value = states_in.get(key)
            if isinstance(value, list | tuple):
                value = np.asarray(value) if all(isinstance(v, int | float) for v in value) else None
            if isinstance(value, np.generic):
                value = np.asarray(value)
            want = f"{size} numbers (float32)"
            if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiub" or value.size != size:
                got = "nothing" if value is None else (f"{value.dtype}{list(value.shape)}"
                                                       if isinstance(value, np.ndarray) else type(value).__name__)
                raise ProtocolError(path, want, got)
            vector = value.astype(np.float32).reshape(-1)
            if not np.all(np.isfinite(vector)):
                raise ProtocolError(path, want, "non-finite values")
            parts.append(vector)
        state = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        prompt = obs.get(self.prompt)
        if prompt is not None and (not isinstance(prompt, str) or len(prompt.encode()) > MAX_INSTRUCTION_BYTES):
            raise ProtocolError(self.prompt, f"UTF-8 text of at most {MAX_INSTRUCTION_BYTES} bytes (the instruction)",
                                f"{len(prompt.encode())} bytes" if isinstance(prompt, str) else type(prompt).__name__)
        # An empty prompt is no instruction (openpi clients send "" for none).
        return images, state, prompt if prompt and prompt.strip() else None

    def build(self, images: dict[str, np.ndarray], state: np.ndarray, prompt: str | None) -> dict[str, Any]:
        """One observation in this layout (the robot side's request)."""
        by_camera = {camera: key for key, camera in self.images.items()}
        image_map = {by_camera[camera]: image for camera, image in images.items() if camera in by_camera}
        state_map: dict[str, np.ndarray] = {}
        offset = 0
        vector = np.asarray(state, dtype=np.float32)
        for key, size in zip(self.state, self.state_sizes, strict=True):
            state_map[key] = vector[offset:offset + size]
            offset += size
        obs: dict[str, Any] = ({**image_map, **state_map} if self.layout == "flat"
                               else {NESTED_IMAGES: image_map, NESTED_STATES: state_map})
        if prompt is not None:
            obs[self.prompt] = prompt
        return obs


def detect_layout(obs: dict[str, Any]) -> str:
    """``nested`` when the observation has the seed's ``images`` or ``states`` map, else ``flat``."""
    nested = isinstance(obs.get(NESTED_IMAGES), dict) or isinstance(obs.get(NESTED_STATES), dict)
    return "nested" if nested else "flat"


def read_api_key(path: str, field: str, config: DeploymentConfig) -> str:
    """The API key in the file ``path`` (surrounding white space dropped); ``ConfigError`` naming ``field``."""
    from common.config import ConfigError

    try:
        key = config.resolve(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(field, f"cannot read the API key file {path!r}: {exc}") from exc
    if not key or any(ch.isspace() for ch in key) or not key.isprintable():
        raise ConfigError(field, f"expected one printable word (the API key) in {path!r}")
    return key
