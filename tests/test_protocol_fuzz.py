"""Decoder fuzzing: random and mutated frames never raise anything but ProtocolError, and a
msgpack-numpy object-array payload (whose unpickling would have a side effect) is never unpickled."""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import msgpack
import msgpack_numpy
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.wire.protocol import (
    KIND_FRAME,
    KIND_REQUEST,
    MAX_INSTRUCTION_BYTES,
    Message,
    ProtocolError,
    check_instruction,
    decode,
    encode,
)

SIDE_EFFECT_FILE = Path("/tmp/armpipe-fuzz-side-effect")


class _TouchesAFile:
    """Unpickling this creates SIDE_EFFECT_FILE: proof that pickle ran."""

    def __reduce__(self):
        return (SIDE_EFFECT_FILE.touch, ())


def _valid_frames() -> list[bytes]:
    msg = Message(kind=KIND_REQUEST, src="client", seq=3, meta={"op": "infer", "client": "c", "obs_t": 1.0},
                  arrays={"observation.images.front": np.arange(5000, dtype=np.uint8).reshape(50, 100),
                          "observation.state": np.linspace(-1, 1, 6, dtype=np.float32)})
    return [bytes(memoryview(frame)) if not isinstance(frame, bytes) else frame for frame in encode(msg)]


def _decode_only_protocol_errors(frames: list[bytes]) -> None:
    with contextlib.suppress(ProtocolError):
        decode(frames)


@pytest.fixture(autouse=True)
def _no_side_effect_before_and_after():
    SIDE_EFFECT_FILE.unlink(missing_ok=True)
    yield
    assert not SIDE_EFFECT_FILE.exists(), "pickle ran while decoding untrusted bytes"


def _evil_inline_header(kind: bytes = b"O", type_text: object = "|O", nd: object = True) -> bytes:
    payload = {b"nd": nd, b"type": type_text, b"kind": kind, b"shape": [1], b"data": pickle.dumps(_TouchesAFile())}
    header = {"v": 1, "kind": KIND_FRAME, "src": "x", "seq": 1, "t": 0.0, "meta": {"camera": "c"},
              "arrays": [{"name": "a", "dtype": "uint8", "shape": [1], "enc": "inline", "data": payload}]}
    return msgpack.packb(header, use_bin_type=True)


def test_the_side_effect_is_real_when_msgpack_numpy_decodes_unguarded():
    # Guard against a vacuous test: the payload does trigger pickle in msgpack-numpy itself.
    packed = msgpack.packb({b"nd": True, b"type": "|O", b"kind": b"O", b"shape": [1],
                            b"data": pickle.dumps(_TouchesAFile())}, use_bin_type=True)
    msgpack.unpackb(packed, object_hook=msgpack_numpy.decode, strict_map_key=False)
    assert SIDE_EFFECT_FILE.exists()
    SIDE_EFFECT_FILE.unlink()


@pytest.mark.parametrize(
    "header",
    [
        _evil_inline_header(),
        _evil_inline_header(kind=b""),  # no kind flag, object dtype string
        _evil_inline_header(kind=b"V", type_text=[["a", "|O"]]),
        _evil_inline_header(nd=False),
        _evil_inline_header(kind="O"),
    ],
)
def test_object_array_payloads_are_refused_before_pickle(header):
    with pytest.raises(ProtocolError):
        decode([header])


def test_object_payload_hidden_in_meta_is_refused():
    evil = {b"nd": True, b"type": "|O", b"kind": b"O", b"shape": [1], b"data": pickle.dumps(_TouchesAFile())}
    header = {"v": 1, "kind": KIND_FRAME, "src": "x", "seq": 1, "t": 0.0,
              "meta": {"camera": "c", "nested": [evil]}, "arrays": []}
    with pytest.raises(ProtocolError):
        decode([msgpack.packb(header, use_bin_type=True)])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_random_frames(frames):
    _decode_only_protocol_errors(frames)


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_mutated_valid_frames(data):
    frames = _valid_frames()
    index = data.draw(st.integers(0, len(frames) - 1))
    frame = bytearray(frames[index])
    operation = data.draw(st.sampled_from(["flip", "truncate", "insert", "drop_frame", "dup_frame"]))
    if operation == "flip" and frame:
        for _ in range(data.draw(st.integers(1, 8))):
            position = data.draw(st.integers(0, len(frame) - 1))
            frame[position] ^= 1 << data.draw(st.integers(0, 7))
        frames[index] = bytes(frame)
    elif operation == "truncate":
        frames[index] = bytes(frame[: data.draw(st.integers(0, len(frame)))])
    elif operation == "insert":
        position = data.draw(st.integers(0, len(frame)))
        frames[index] = bytes(frame[:position] + data.draw(st.binary(min_size=1, max_size=16)) + frame[position:])
    elif operation == "drop_frame":
        del frames[index]
    else:
        frames.insert(index, frames[index])
    _decode_only_protocol_errors(frames)


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6) | st.binary(max_size=6),
                                                                     children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(header=st.dictionaries(st.sampled_from(["v", "kind", "src", "seq", "t", "meta", "arrays", "x"]),
                              _msgpack_values, max_size=8))
def test_structurally_random_headers(header):
    _decode_only_protocol_errors([msgpack.packb(header, use_bin_type=True)])


@settings(max_examples=300, deadline=None)
@given(spec=st.dictionaries(st.sampled_from(["name", "dtype", "shape", "enc", "frame", "data"]), _msgpack_values,
                            max_size=6),
       payload=st.binary(max_size=64))
def test_random_array_descriptors(spec, payload):
    header = {"v": 1, "kind": KIND_FRAME, "src": "x", "seq": 1, "t": 0.0, "meta": {"camera": "c"},
              "arrays": [spec]}
    _decode_only_protocol_errors([msgpack.packb(header, use_bin_type=True), payload])


@settings(max_examples=300, deadline=None)
@given(nd=_msgpack_values | st.just(True), type_text=st.text(max_size=12) | st.binary(max_size=12) | _msgpack_values,
       kind=st.sampled_from([b"", b"O", b"V", "", "O", None]), shape=_msgpack_values, data=st.binary(max_size=64))
def test_random_inline_numpy_dicts(nd, type_text, kind, shape, data):
    payload = {b"nd": nd, b"type": type_text, b"kind": kind, b"shape": shape, b"data": data}
    header = {"v": 1, "kind": KIND_FRAME, "src": "x", "seq": 1, "t": 0.0, "meta": {"camera": "c"},
              "arrays": [{"name": "a", "dtype": "uint8", "shape": [1], "enc": "inline", "data": payload}]}
    _decode_only_protocol_errors([msgpack.packb(header, use_bin_type=True)])


def _infer_header(instruction: object) -> bytes:
    header = {"v": 1, "kind": KIND_REQUEST, "src": "x", "seq": 1, "t": 0.0,
              "meta": {"op": "infer", "client": "c", "obs_t": 1.0, "instruction": instruction}, "arrays": []}
    return msgpack.packb(header, use_bin_type=True)


@settings(max_examples=400, deadline=None)
@given(instruction=_msgpack_values | st.text(max_size=700), required=st.booleans())
def test_any_instruction_value_is_text_within_bounds_or_a_named_error(instruction, required):
    # Whatever a peer puts in meta.instruction: the decoder and the server's check either give back UTF-8 text of
    # 1..512 bytes that is not blank, or refuse it naming meta.instruction.
    try:
        msg = decode([_infer_header(instruction)])
    except ProtocolError:  # a value that looks like a msgpack-numpy array: refused as the decoder refuses those
        return
    try:
        text = check_instruction(msg.meta, required=required)
    except ProtocolError as exc:
        assert exc.field == "meta.instruction"
        assert "UTF-8 text of 1..512 bytes" in exc.expected
        return
    if instruction is None:
        assert text is None and not required
    else:
        assert text == instruction and text.strip()
        assert 1 <= len(text.encode("utf-8")) <= MAX_INSTRUCTION_BYTES


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(min_size=1, max_size=64))
def test_instruction_bytes_that_are_not_utf8_name_the_field(raw):
    # The header is valid msgpack with a str whose bytes are arbitrary: invalid UTF-8 names meta.instruction,
    # valid UTF-8 decodes as that text.
    placeholder = "Z" * len(raw)
    header = _infer_header(placeholder)
    assert header.count(placeholder.encode()) == 1
    header = header.replace(placeholder.encode(), raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(ProtocolError) as info:
            decode([header])
        assert info.value.field == "meta.instruction"
        return
    assert decode([header]).meta["instruction"] == text


def test_an_oversized_or_empty_instruction_is_refused_before_it_is_sent():
    from common.wire.policy_client import PolicyClient

    client = PolicyClient.__new__(PolicyClient)  # infer checks the instruction before it touches a socket
    for bad in ("", "x" * (MAX_INSTRUCTION_BYTES + 1), 12):
        with pytest.raises(ProtocolError) as info:
            client.infer({}, np.zeros(6, np.float32), 0.0, instruction=bad)  # type: ignore[arg-type]
        assert info.value.field == "meta.instruction"


_meta_values = st.recursive(  # what a peer may put in meta: msgpack primitives with string keys
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(height=st.integers(1, 64), width=st.integers(1, 64), payload=st.binary(min_size=1, max_size=64),
       junk=_meta_values)
def test_a_jpeg_shape_travels_only_in_its_array_descriptor(height, width, payload, junk):
    """A JPEG array's image shape is its descriptor's ``shape`` (``Message.jpeg_shapes`` in Python), never a meta
    key: whatever a peer puts in ``meta._jpeg_shapes`` (the key armpipe kept inside the process before) is plain
    meta, passed on as it came, and changes neither the shape a receiver sees nor the one a pass-through sends."""
    frames = encode(Message(kind=KIND_FRAME, meta={"camera": "c", "_jpeg_shapes": junk},
                            arrays={"image": np.frombuffer(payload, np.uint8)}, jpeg={"image"},
                            jpeg_shapes={"image": (height, width, 3)}))
    header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
    assert header["arrays"][0]["shape"] == [height, width, 3] and header["arrays"][0]["enc"] == "jpeg"
    received = decode(frames)
    assert received.jpeg == {"image"} and received.jpeg_shapes == {"image": (height, width, 3)}
    assert set(received.meta) == {"camera", "_jpeg_shapes"}
    # Passed through (the actuator sends a camera's bytes on as they came): the same descriptor again.
    again = decode(encode(Message(kind=KIND_FRAME, meta=received.meta, arrays=received.arrays, jpeg=received.jpeg,
                                  jpeg_shapes=received.jpeg_shapes)))
    assert again.jpeg_shapes == {"image": (height, width, 3)} and again.arrays["image"].tobytes() == payload


def test_jpeg_bytes_passed_through_without_their_shape_are_refused_naming_the_array():
    msg = Message(kind=KIND_FRAME, meta={"camera": "c", "_jpeg_shapes": {"image": [4, 4, 3]}},
                  arrays={"image": np.ones(10, np.uint8)}, jpeg={"image"})
    with pytest.raises(ProtocolError, match=r"arrays\[image\]\.shape: expected the \[H, W, 3\] image shape"):
        encode(msg)
