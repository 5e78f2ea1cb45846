"""The armpipe wire format: one multipart ZeroMQ message per logical message.

Frame 0 is a msgpack header; frames 1..N each carry one large array's raw bytes (or its JPEG bytes),
sent without copying and received as zero-copy ``np.frombuffer`` views. Small arrays may ride inside
the header as msgpack-numpy dicts. ``docs/protocol.md`` is the normative description; keep the two in
step.

Decoding is strict because the bytes come from the network: only the dtypes named in
``ALLOWED_DTYPES``, bounded sizes, required fields, a schema-version check, and nothing ever reaches
``pickle`` (msgpack-numpy's decoder unpickles object arrays, so those are rejected before it runs).
Every failure is a ``ProtocolError`` naming the field and what was expected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import msgpack_numpy
import numpy as np

SCHEMA_VERSION = 1

# Message kinds. Requests carry an ``op`` in their meta; see REQUEST_OPS.
KIND_FRAME = "frame"
KIND_STATE = "state"
KIND_ACTION = "action"
KIND_EVENT = "event"
KIND_REQUEST = "request"
KIND_REPLY = "reply"
KIND_ERROR = "error"
KINDS = (KIND_FRAME, KIND_STATE, KIND_ACTION, KIND_EVENT, KIND_REQUEST, KIND_REPLY, KIND_ERROR)

# meta.source of frames and states the dataset player publishes (a camera's is "camera"): their rows have
# ground truth on player.gt_endpoint.
SOURCE_DATASET = "dataset"

# Policy node ops, then the actuator control socket's ops (same request/reply framing).
POLICY_OPS = ("metadata", "infer", "reset", "ping")
CONTROL_OPS = ("start", "stop", "label", "status", "instruction", "backlog")
REQUEST_OPS = POLICY_OPS + CONTROL_OPS

# dtype name on the wire -> numpy dtype. Little-endian only; nothing else is accepted.
ALLOWED_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("uint8", "uint16", "int32", "int64", "float32", "float64", "bool")
}
ENCODINGS = ("raw", "jpeg", "inline")

# Bounds. A 3-camera 480x640 observation is ~2.8 MB; these leave room for 4K depth without letting a
# hostile peer make us allocate gigabytes.
MAX_HEADER_BYTES = 256 * 1024
MAX_ARRAYS = 32
MAX_NDIM = 4
MAX_DIM = 8192
MAX_ARRAY_BYTES = 64 * 1024 * 1024
MAX_INLINE_BYTES = 4096  # arrays at most this big ride in the header by default
MAX_MESSAGE_BYTES = 128 * 1024 * 1024  # also set as ZMQ_MAXMSGSIZE on every socket (per frame)
MAX_NAME_LEN = 128

# A language policy's task instruction: ``meta.instruction`` of an ``infer`` request, UTF-8 text of
# 1..MAX_INSTRUCTION_BYTES bytes (docs/protocol.md, section 5).
INSTRUCTION_KEY = "instruction"
MAX_INSTRUCTION_BYTES = 512


class ProtocolError(ValueError):
    """A message that does not follow the protocol. ``field`` names the offending field."""

    def __init__(self, field: str, expected: str, got: Any = None) -> None:
        self.field = field
        self.expected = expected
        self.got = None if got is None else _short_repr(got)
        detail = f"; got {self.got}" if self.got is not None else ""
        super().__init__(f"{field}: expected {expected}{detail}")


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Message:
    """One logical message. ``arrays`` keeps insertion order; it is the order of the frames."""

    kind: str
    src: str = ""
    seq: int = 0
    # Capture (or send) time on the sender's monotonic clock, seconds.
    t: float = field(default_factory=time.monotonic)
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    # Names of arrays that are JPEG-encoded on the wire (uint8 HxWx3 only). Decoding leaves them as
    # undecoded 1-D uint8 byte arrays listed here, so the receiver chooses where to decode (CPU/GPU).
    jpeg: set[str] = field(default_factory=set)
    # For each array of ``jpeg`` that holds JPEG bytes already (1-D uint8): the (H, W, 3) image they decode to.
    # ``decode`` fills it from the array's descriptor (its ``shape`` on the wire); a sender passing JPEG bytes
    # through sets it, and ``encode`` writes it into the descriptor.
    jpeg_shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
        raise ProtocolError(where, f"a non-empty string of at most {MAX_NAME_LEN} characters", name)
    return name


def _c_contiguous(array: np.ndarray) -> np.ndarray:
    # Not np.ascontiguousarray: it turns 0-d arrays into 1-d ones.
    return array if array.flags.c_contiguous else array.copy(order="C")


def _wire_dtype(array: np.ndarray, where: str) -> str:
    name = array.dtype.name
    if name not in ALLOWED_DTYPES:
        raise ProtocolError(f"{where}.dtype", f"one of {sorted(ALLOWED_DTYPES)}", name)
    return str(name)


def encode(
    msg: Message,
    *,
    inline_max_bytes: int = MAX_INLINE_BYTES,
    jpeg_quality: int | Mapping[str, int] = 90,
) -> list[Any]:
    """Turn a message into the frames for ``socket.send_multipart(frames, copy=False)``.

    Arrays named in ``msg.jpeg`` are either uint8 HxWx3 images, JPEG-encoded here at ``jpeg_quality`` (one
    quality, or one per array name), or JPEG bytes already (1-D uint8, as ``decode`` leaves them, with their
    image shape in ``msg.jpeg_shapes[name]``), sent as they are: a frame is never encoded twice.
    Large arrays are returned as the arrays themselves (no copy): the caller must not mutate them until the
    send completes.
    """
    if msg.kind not in KINDS:
        raise ProtocolError("kind", f"one of {list(KINDS)}", msg.kind)
    if len(msg.arrays) > MAX_ARRAYS:
        raise ProtocolError("arrays", f"at most {MAX_ARRAYS} arrays", len(msg.arrays))
    specs: list[dict[str, Any]] = []
    frames: list[Any] = []
    meta = msg.meta
    for name, value in msg.arrays.items():
        _check_name(name, "arrays.name")
        array = np.asarray(value)
        where = f"arrays[{name}]"
        if name in msg.jpeg:
            if array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3:
                from common.wire.images import encode_jpeg  # lazy: cv2 is only needed for JPEG

                shape = list(array.shape)
                quality = jpeg_quality if isinstance(jpeg_quality, int) else jpeg_quality.get(name, 90)
                payload = encode_jpeg(array, quality)
            elif array.dtype == np.uint8 and array.ndim == 1 and array.size:
                shape = [int(dim) for dim in msg.jpeg_shapes.get(name, ())]
                if len(shape) != 3 or shape[2] != 3:
                    raise ProtocolError(f"{where}.shape", "the [H, W, 3] image shape of the JPEG bytes passed "
                                        f"through (Message.jpeg_shapes[{name!r}])", shape or None)
                payload = array
            else:
                raise ProtocolError(where, "a uint8 HxWx3 image for jpeg encoding, or JPEG bytes (1-D uint8)",
                                    f"{array.dtype}{array.shape}")
            specs.append({"name": name, "dtype": "uint8", "shape": shape, "enc": "jpeg",
                          "frame": len(frames) + 1})
            frames.append(payload)
            continue
        dtype = _wire_dtype(array, where)
        if array.dtype.byteorder == ">":
            array = array.astype(ALLOWED_DTYPES[dtype])
        if array.nbytes <= inline_max_bytes:
            specs.append({"name": name, "dtype": dtype, "shape": list(array.shape), "enc": "inline",
                          "data": msgpack_numpy.encode(_c_contiguous(array))})
        else:
            specs.append({"name": name, "dtype": dtype, "shape": list(array.shape), "enc": "raw",
                          "frame": len(frames) + 1})
            frames.append(_c_contiguous(array))
    header = {
        "v": SCHEMA_VERSION,
        "kind": msg.kind,
        "src": msg.src,
        "seq": int(msg.seq),
        "t": float(msg.t),
        "meta": meta,
        "arrays": specs,
    }
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError) as exc:
        raise ProtocolError("meta", "only msgpack primitives (None, bool, int, float, str, bytes, "
                            "lists and string-keyed maps)", str(exc)) from exc
    if len(packed) > MAX_HEADER_BYTES:
        raise ProtocolError("header", f"at most {MAX_HEADER_BYTES} bytes", len(packed))
    return [packed, *frames]


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def _frame_buffer(frame: Any) -> memoryview:
    """A read-only view of one received frame (zmq.Frame, bytes, or any buffer)."""
    buffer = getattr(frame, "buffer", frame)
    return memoryview(buffer)


def _safe_numpy_hook(obj: dict[Any, Any]) -> Any:
    """msgpack ``object_hook`` that lets msgpack-numpy decode only plain numeric arrays.

    msgpack-numpy calls ``pickle.loads`` for dtype kind 'O' and builds structured dtypes for 'V'; both
    are refused here before ``msgpack_numpy.decode`` sees the dict.
    """
    if b"nd" not in obj:
        if b"complex" in obj:
            raise ProtocolError("header", "no complex-number objects", "complex")
        return obj
    if obj.get(b"nd") is not True:
        raise ProtocolError("arrays[].data", "an ndarray dict (numpy scalars are not allowed)",
                            obj.get(b"type"))
    kind = obj.get(b"kind", b"")
    dtype_text = obj.get(b"type")
    if kind not in (b"", "") or not isinstance(dtype_text, (str, bytes)):
        raise ProtocolError("arrays[].data.kind", "a plain numeric dtype (object and structured "
                            "arrays are refused)", kind or dtype_text)
    if isinstance(dtype_text, bytes):
        dtype_text = dtype_text.decode("ascii", "replace")
    try:
        dtype = np.dtype(dtype_text)
    except (TypeError, ValueError, SyntaxError) as exc:
        raise ProtocolError("arrays[].data.type", "a numpy dtype string", dtype_text) from exc
    if dtype.name not in ALLOWED_DTYPES or dtype.byteorder == ">":
        raise ProtocolError("arrays[].data.type", f"one of {sorted(ALLOWED_DTYPES)}, little-endian",
                            dtype_text)
    shape = obj.get(b"shape")
    data = obj.get(b"data")
    if not isinstance(shape, (list, tuple)) or not isinstance(data, (bytes, bytearray)):
        raise ProtocolError("arrays[].data", "shape list and data bytes", type(data).__name__)
    shape = _check_shape(shape, "arrays[].data.shape")
    if math.prod(shape) * dtype.itemsize != len(data):
        raise ProtocolError("arrays[].data", f"{math.prod(shape) * dtype.itemsize} bytes for shape "
                            f"{shape} of {dtype.name}", f"{len(data)} bytes")
    return msgpack_numpy.decode(obj)


def _check_shape(shape: Any, where: str) -> list[int]:
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM:
        raise ProtocolError(where, f"a list of at most {MAX_NDIM} dimensions", shape)
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or not 0 <= dim <= MAX_DIM:
            raise ProtocolError(where, f"dimensions that are integers in 0..{MAX_DIM}", shape)
    return list(shape)


def _require(header: Mapping[str, Any], key: str, types: type | tuple[type, ...], expected: str) -> Any:
    if key not in header:
        raise ProtocolError(key, f"{expected} (field is missing)")
    value = header[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise ProtocolError(key, expected, value)
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def decode(frames: Sequence[Any]) -> Message:
    """Parse received frames into a ``Message``; raises ``ProtocolError`` naming the bad field.

    Raw arrays are read-only views of the received frames (no copy). Arrays listed in
    ``Message.jpeg`` are still JPEG bytes (1-D uint8); their declared shapes (the descriptors') are in
    ``Message.jpeg_shapes[name]`` (see ``decode_images``).
    """
    if not frames:
        raise ProtocolError("frames", "at least one frame (the header)", 0)
    header_view = _frame_buffer(frames[0])
    if header_view.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError("header", f"at most {MAX_HEADER_BYTES} bytes", header_view.nbytes)
    try:
        header = msgpack.unpackb(
            header_view,
            raw=False,
            strict_map_key=False,  # msgpack-numpy's dict keys are bytes
            object_hook=_safe_numpy_hook,
        )
    except ProtocolError:
        raise
    except UnicodeDecodeError as exc:
        _refuse_invalid_text(header_view)
        raise ProtocolError("header", "a msgpack map with UTF-8 strings", f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("header", "a msgpack map", f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError("header", "a msgpack map", type(header).__name__)
    version = _require(header, "v", int, "an integer schema version")
    if version != SCHEMA_VERSION:
        raise ProtocolError("v", f"schema version {SCHEMA_VERSION}", version)
    kind = _require(header, "kind", str, f"one of {list(KINDS)}")
    if kind not in KINDS:
        raise ProtocolError("kind", f"one of {list(KINDS)}", kind)
    src = _require(header, "src", str, "a string naming the sender")
    seq = _require(header, "seq", int, "an integer sequence number")
    t = _require(header, "t", (int, float), "a float time in seconds")
    if not math.isfinite(t):
        raise ProtocolError("t", "a finite time", t)
    meta = _require(header, "meta", dict, "a map of metadata")
    if not all(isinstance(k, str) for k in meta):
        raise ProtocolError("meta", "a map with string keys", list(meta)[:4])
    specs = _require(header, "arrays", list, "a list of array descriptors")
    if len(specs) > MAX_ARRAYS:
        raise ProtocolError("arrays", f"at most {MAX_ARRAYS} arrays", len(specs))

    arrays: dict[str, np.ndarray] = {}
    jpeg: set[str] = set()
    jpeg_shapes: dict[str, tuple[int, int, int]] = {}
    used_frames: set[int] = set()
    for index, spec in enumerate(specs):
        where = f"arrays[{index}]"
        if not isinstance(spec, dict):
            raise ProtocolError(where, "a map", type(spec).__name__)
        name = _check_name(spec.get("name"), f"{where}.name")
        where = f"arrays[{name}]"
        if name in arrays:
            raise ProtocolError(where, "unique array names", name)
        dtype_name = spec.get("dtype")
        if not isinstance(dtype_name, str) or dtype_name not in ALLOWED_DTYPES:
            raise ProtocolError(f"{where}.dtype", f"one of {sorted(ALLOWED_DTYPES)}", dtype_name)
        dtype = ALLOWED_DTYPES[dtype_name]
        shape = _check_shape(spec.get("shape"), f"{where}.shape")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > MAX_ARRAY_BYTES:
            raise ProtocolError(f"{where}.shape", f"at most {MAX_ARRAY_BYTES} bytes of data", shape)
        enc = spec.get("enc")
        if enc not in ENCODINGS:
            raise ProtocolError(f"{where}.enc", f"one of {list(ENCODINGS)}", enc)
        if enc == "inline":
            value = spec.get("data")
            if not isinstance(value, np.ndarray):
                raise ProtocolError(f"{where}.data", "an inline msgpack-numpy array", type(value).__name__)
            if value.dtype != dtype or list(value.shape) != shape:
                raise ProtocolError(f"{where}.data", f"{dtype_name}{shape} as declared",
                                    f"{value.dtype}{list(value.shape)}")
            arrays[name] = value
            continue
        frame_index = spec.get("frame")
        if (not isinstance(frame_index, int) or isinstance(frame_index, bool)
                or not 1 <= frame_index < len(frames) or frame_index in used_frames):
            raise ProtocolError(f"{where}.frame", f"an unused frame index in 1..{len(frames) - 1}",
                                frame_index)
        used_frames.add(frame_index)
        buffer = _frame_buffer(frames[frame_index])
        if enc == "jpeg":
            if dtype_name != "uint8" or len(shape) != 3 or shape[2] != 3:
                raise ProtocolError(f"{where}.shape", "uint8 [H, W, 3] for a jpeg image",
                                    f"{dtype_name}{shape}")
            if buffer.nbytes == 0 or buffer.nbytes > MAX_ARRAY_BYTES:
                raise ProtocolError(f"{where}.frame", "non-empty JPEG bytes", buffer.nbytes)
            arrays[name] = np.frombuffer(buffer, dtype=np.uint8)
            jpeg.add(name)
            jpeg_shapes[name] = (shape[0], shape[1], shape[2])
            continue
        if buffer.nbytes != nbytes:
            raise ProtocolError(f"{where}.frame", f"{nbytes} bytes for {dtype_name}{shape}",
                                f"{buffer.nbytes} bytes")
        arrays[name] = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    if len(used_frames) != len(frames) - 1:
        raise ProtocolError("frames", f"{len(used_frames) + 1} frames as the header declares",
                            len(frames))
    msg = Message(kind=kind, src=src, seq=seq, t=float(t), meta=meta, arrays=arrays, jpeg=jpeg,
                  jpeg_shapes=jpeg_shapes)
    validate_meta(msg)
    return msg


def _refuse_invalid_text(header_view: memoryview) -> None:
    """A header whose strings are not all UTF-8: when the bad one is ``meta.instruction`` (user-typed text,
    the one string a person writes), say so by name; otherwise return and the caller names the header."""
    try:
        header = msgpack.unpackb(header_view, raw=False, strict_map_key=False, object_hook=_safe_numpy_hook,
                                 unicode_errors="surrogateescape")
    except Exception:  # garbage elsewhere too: the caller's header error stands
        return
    meta = header.get("meta") if isinstance(header, dict) else None
    value = meta.get(INSTRUCTION_KEY) if isinstance(meta, dict) else None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ProtocolError(f"meta.{INSTRUCTION_KEY}", _INSTRUCTION_EXPECTED,
                                f"invalid UTF-8 at byte {exc.start}") from None


_INSTRUCTION_EXPECTED = f"the task instruction as UTF-8 text of 1..{MAX_INSTRUCTION_BYTES} bytes"


def check_instruction(meta: Mapping[str, Any], *, required: bool) -> str | None:
    """``meta.instruction`` of an ``infer`` request: the text, or ``None`` when it is absent and not
    ``required`` (a policy that takes no instruction ignores one). Raises ``ProtocolError`` on
    ``meta.instruction`` for a non-string, empty or oversized value, and when a language policy
    (``required``) gets none."""
    where = f"meta.{INSTRUCTION_KEY}"
    if INSTRUCTION_KEY not in meta or meta[INSTRUCTION_KEY] is None:
        if required:
            raise ProtocolError(where, f"{_INSTRUCTION_EXPECTED} (field is missing; this policy takes a language "
                                "instruction: contract.takes_instruction is true)")
        return None
    value = meta[INSTRUCTION_KEY]
    if not isinstance(value, str):
        raise ProtocolError(where, _INSTRUCTION_EXPECTED, type(value).__name__)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:  # a str that came through surrogateescape: not UTF-8 on the wire
        raise ProtocolError(where, _INSTRUCTION_EXPECTED, f"invalid UTF-8 at character {exc.start}") from None
    if not value.strip():
        raise ProtocolError(where, _INSTRUCTION_EXPECTED, "empty text" if not value else "only whitespace")
    if size > MAX_INSTRUCTION_BYTES:
        raise ProtocolError(where, _INSTRUCTION_EXPECTED, f"{size} bytes")
    return value


def decode_images(msg: Message) -> Message:
    """Decode every JPEG array of ``msg`` in place on the CPU and check its declared shape."""
    if not msg.jpeg:
        return msg
    from common.wire.images import decode_jpeg

    for name in sorted(msg.jpeg):
        image = decode_jpeg(msg.arrays[name], f"arrays[{name}]")
        declared = msg.jpeg_shapes.get(name, image.shape)
        if tuple(image.shape) != tuple(declared):
            raise ProtocolError(f"arrays[{name}].shape", f"decoded image of shape {list(declared)}",
                                list(image.shape))
        msg.arrays[name] = image
    msg.jpeg.clear()
    msg.jpeg_shapes.clear()
    return msg


# --------------------------------------------------------------------------------------------------
# Per-kind metadata
# --------------------------------------------------------------------------------------------------

# kind -> {meta key: (accepted types, description)}; only required keys are listed.
_REQUIRED_META: dict[str, dict[str, tuple[tuple[type, ...], str]]] = {
    KIND_FRAME: {"camera": ((str,), "the camera name")},
    KIND_STATE: {"arm": ((str,), "the arm name"), "names": ((list,), "the joint names")},
    KIND_ACTION: {"role": ((str,), "'executed' or 'ground_truth'"),
                  "names": ((list,), "the action names")},
    KIND_EVENT: {"event": ((str,), "the event name")},
    KIND_REQUEST: {"op": ((str,), f"one of {list(REQUEST_OPS)}"),
                   "client": ((str,), "the client's session id")},
    KIND_REPLY: {"op": ((str,), "the request op this answers")},
    KIND_ERROR: {"field": ((str,), "the offending field"),
                 "expected": ((str,), "what was expected"),
                 "message": ((str,), "a readable message")},
}


def validate_meta(msg: Message) -> None:
    for key, (types, description) in _REQUIRED_META[msg.kind].items():
        if key not in msg.meta:
            raise ProtocolError(f"meta.{key}", f"{description} (field is missing)")
        if not isinstance(msg.meta[key], types):
            raise ProtocolError(f"meta.{key}", description, msg.meta[key])
    if msg.kind == KIND_REQUEST and msg.meta["op"] not in REQUEST_OPS:
        raise ProtocolError("meta.op", f"one of {list(REQUEST_OPS)}", msg.meta["op"])


def error_message(error: ProtocolError | Exception, *, src: str, seq: int = 0, op: str = "",
                  obs_t: float | None = None) -> Message:
    """The ``error`` reply for a failed request: names the field and what was expected."""
    if isinstance(error, ProtocolError):
        field_name, expected, message = error.field, error.expected, str(error)
    else:
        field_name = getattr(error, "field", "request")
        expected = getattr(error, "expected", "a request the server can process")
        message = str(error) or type(error).__name__
    meta: dict[str, Any] = {"field": field_name, "expected": expected, "message": message, "op": op}
    if obs_t is not None:
        meta["obs_t"] = obs_t
    return Message(kind=KIND_ERROR, src=src, seq=seq, meta=meta)
