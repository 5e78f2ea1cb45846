"""Wire protocol: round trips over real sockets, zero-copy views, strict decoding, named errors (also on a
reply's rtc guidance rows)."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bench.harness import StandInServer, free_endpoint
from common.wire.contract import RTC_GUIDE_KEY
from common.wire.policy_client import PolicyClient
from common.wire.protocol import (
    ALLOWED_DTYPES,
    KIND_ERROR,
    KIND_FRAME,
    KIND_REPLY,
    KIND_REQUEST,
    KIND_STATE,
    MAX_INLINE_BYTES,
    SCHEMA_VERSION,
    Message,
    ProtocolError,
    decode,
    decode_images,
    encode,
    error_message,
)
from common.wire.transport import SocketFactory, recv_message, send_message


@pytest.fixture(scope="module")
def pair() -> tuple[zmq.Socket, zmq.Socket]:
    factory = SocketFactory(zmq.Context())
    server = factory.socket(zmq.PAIR)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = factory.socket(zmq.PAIR)
    client.connect(f"tcp://127.0.0.1:{port}")
    yield client, server
    client.close(0)
    server.close(0)
    factory.context.term()


array_strategy = st.sampled_from(sorted(ALLOWED_DTYPES)).flatmap(
    lambda dtype: hnp.arrays(
        dtype=ALLOWED_DTYPES[dtype],
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=40),
        elements={"allow_nan": True, "allow_infinity": True} if dtype.startswith("float") else None,
    )
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrays=st.lists(array_strategy, min_size=0, max_size=5), seq=st.integers(0, 2**62))
def test_round_trip_over_a_socket_keeps_values_and_returns_views(pair, arrays, seq):
    client, server = pair
    msg = Message(kind=KIND_FRAME, src="cam", seq=seq, t=12.5, meta={"camera": "front", "extra": [1, "a"]},
                  arrays={f"a{i}": array for i, array in enumerate(arrays)})
    send_message(client, msg)
    frames = server.recv_multipart(copy=False)
    received = decode(frames)
    assert received.kind == KIND_FRAME and received.seq == seq and received.t == 12.5
    assert received.meta["camera"] == "front" and received.meta["extra"] == [1, "a"]
    assert list(received.arrays) == list(msg.arrays)
    for name, original in msg.arrays.items():
        got = received.arrays[name]
        assert got.dtype == original.dtype and got.shape == original.shape
        np.testing.assert_array_equal(got, original)
        if original.nbytes > MAX_INLINE_BYTES:
            # Large arrays are views of a received frame, not copies.
            assert any(np.shares_memory(got, np.frombuffer(f.buffer, np.uint8)) for f in frames[1:])


def test_large_array_travels_as_its_own_frame_without_copy(pair):
    client, server = pair
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    send_message(client, Message(kind=KIND_FRAME, meta={"camera": "front"}, arrays={"image": image}))
    frames = server.recv_multipart(copy=False)
    assert len(frames) == 2 and frames[1].buffer.nbytes == image.nbytes
    received = decode(frames)
    assert np.shares_memory(received.arrays["image"], np.frombuffer(frames[1].buffer, np.uint8))
    np.testing.assert_array_equal(received.arrays["image"], image)


def test_small_arrays_ride_inline_in_the_header():
    frames = encode(Message(kind=KIND_STATE, meta={"arm": "main", "names": ["a"]},
                            arrays={"position": np.arange(6, dtype=np.float32)}))
    assert len(frames) == 1
    assert decode(frames).arrays["position"].tolist() == list(range(6))


def test_jpeg_arrays_decode_to_the_declared_shape():
    yy, xx = np.mgrid[0:48, 0:64]
    image = np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=-1).astype(np.uint8)
    msg = Message(kind=KIND_FRAME, meta={"camera": "front"}, arrays={"image": image}, jpeg={"image"})
    frames = encode(msg, jpeg_quality=95)
    assert len(frames[1]) < image.nbytes
    received = decode(frames)
    assert received.jpeg == {"image"} and received.arrays["image"].ndim == 1
    decoded = decode_images(received).arrays["image"]
    assert decoded.shape == image.shape
    assert np.abs(decoded.astype(int) - image.astype(int)).mean() < 4


def test_corrupt_jpeg_names_the_array():
    image = np.zeros((16, 16, 3), np.uint8)
    frames = encode(Message(kind=KIND_FRAME, meta={"camera": "c"}, arrays={"image": image}, jpeg={"image"}))
    frames[1] = b"\xff\xd8 not a jpeg"
    with pytest.raises(ProtocolError, match=r"arrays\[image\]"):
        decode_images(decode(frames))


def _header(**changes):
    header = {"v": SCHEMA_VERSION, "kind": KIND_FRAME, "src": "x", "seq": 1, "t": 0.0,
              "meta": {"camera": "front"}, "arrays": []}
    header.update(changes)
    return msgpack.packb(header, use_bin_type=True)


@pytest.mark.parametrize(
    ("frames", "field"),
    [
        ([], "frames"),
        ([b"\xc1garbage"], "header"),
        ([msgpack.packb([1, 2])], "header"),
        ([_header(v=99)], "v"),
        ([_header(kind="teleport")], "kind"),
        ([_header(seq="one")], "seq"),
        ([_header(t=float("nan"))], "t"),
        ([_header(meta={"no_camera": 1})], "meta.camera"),
        ([_header(kind=KIND_REQUEST, meta={"op": "explode", "client": "c"})], "meta.op"),
        ([_header(arrays=[{"name": "img", "dtype": "complex128", "shape": [1], "enc": "raw", "frame": 1}]),
          b"\0" * 16], "arrays[img].dtype"),
        ([_header(arrays=[{"name": "img", "dtype": "uint8", "shape": [10], "enc": "raw", "frame": 1}]),
          b"\0" * 9], "arrays[img].frame"),
        ([_header(arrays=[{"name": "img", "dtype": "uint8", "shape": [10], "enc": "raw", "frame": 2}]),
          b"\0" * 10], "arrays[img].frame"),
        ([_header(arrays=[{"name": "img", "dtype": "uint8", "shape": [1, 2, 3, 4, 5], "enc": "raw",
                           "frame": 1}]), b"\0" * 120], "arrays[img].shape"),
        ([_header(arrays=[{"name": "img", "dtype": "float64", "shape": [8192, 8192, 3], "enc": "raw",
                           "frame": 1}]), b""], "arrays[img].shape"),
        ([_header(arrays=[{"name": "img", "dtype": "uint8", "shape": [2], "enc": "gzip", "frame": 1}]),
          b"ab"], "arrays[img].enc"),
        ([_header(), b"unexpected extra frame"], "frames"),
    ],
)
def test_bad_messages_raise_protocol_error_naming_the_field(frames, field):
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert info.value.field == field
    assert info.value.expected  # says what was expected
    assert field in str(info.value)


def test_object_arrays_are_refused_on_encode():
    with pytest.raises(ProtocolError, match="dtype"):
        encode(Message(kind=KIND_FRAME, meta={"camera": "c"}, arrays={"bad": np.array([object()])}))


def test_non_msgpack_meta_is_refused_on_encode():
    with pytest.raises(ProtocolError, match="meta"):
        encode(Message(kind=KIND_FRAME, meta={"camera": "c", "x": object()}))


def test_error_message_carries_field_and_expectation():
    error = ProtocolError("arrays[observation.state].shape", "[6]", [12])
    reply = decode(encode(error_message(error, src="policy", seq=7, op="infer", obs_t=1.5)))
    assert reply.kind == KIND_ERROR and reply.seq == 7
    assert reply.meta["field"] == "arrays[observation.state].shape"
    assert reply.meta["expected"] == "[6]" and reply.meta["obs_t"] == 1.5


def test_big_endian_arrays_are_sent_little_endian():
    big = np.arange(2000, dtype=">f4")
    received = decode(encode(Message(kind=KIND_FRAME, meta={"camera": "c"}, arrays={"x": big})))
    assert received.arrays["x"].dtype == np.dtype("<f4")
    assert math.isclose(float(received.arrays["x"][1999]), 1999.0)


def test_recv_message_reads_a_whole_multipart_message(pair):
    client, server = pair
    send_message(client, Message(kind=KIND_STATE, meta={"arm": "main", "names": ["j"]},
                                 arrays={"position": np.ones(6, np.float32)}))
    assert recv_message(server).meta["arm"] == "main"


class GuideServer(StandInServer):
    """Answers every infer with a good 8-row chunk and the ``rtc_guide`` array it is given."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(SocketFactory(), endpoint)
        self.guide: np.ndarray | None = None

    def answer(self, request: Message) -> Message:
        arrays = {"action": np.zeros((8, 6), np.float32)}
        if self.guide is not None:
            arrays[RTC_GUIDE_KEY] = self.guide
        return Message(kind=KIND_REPLY, seq=request.seq, meta={"op": "infer", "obs_t": request.meta["obs_t"]},
                       arrays=arrays)


@pytest.mark.parametrize("guide, problem", [
    (np.zeros((7, 5), np.float32), "float32(7, 5)"),
    (np.zeros((7, 6), np.float64), "float64(7, 6)"),
    (np.array([[0, 0, np.nan, 0, 0, 0]], np.float32), "non-finite values"),
    (np.zeros(6, np.float32), "float32(6,)"),
])
def test_a_reply_with_a_bad_guide_is_refused_naming_the_array(guide: np.ndarray, problem: str) -> None:
    endpoint = free_endpoint()
    server = GuideServer(endpoint)
    server.start()
    client = PolicyClient(SocketFactory(), endpoint, timeout_s=5.0)
    try:
        images = {"front": np.zeros((4, 4, 3), np.uint8)}
        server.guide = None
        assert client.infer(images, np.zeros(6, np.float32), obs_t=1.0).guide is None
        server.guide = np.ones((7, 6), np.float32)
        np.testing.assert_array_equal(client.infer(images, np.zeros(6, np.float32), obs_t=1.0).guide, server.guide)
        server.guide = guide
        with pytest.raises(ProtocolError) as info:
            client.infer(images, np.zeros(6, np.float32), obs_t=2.0)
        assert info.value.field == f"arrays[{RTC_GUIDE_KEY}]" and "(rows, 6)" in info.value.expected
        assert problem in str(info.value.got)
    finally:
        client.close()
        server.close()


class ObsTServer(StandInServer):
    """Answers every infer with a good chunk whose echoed ``meta.obs_t`` is ``self.obs_t``."""

    def __init__(self, endpoint: str, obs_t: object) -> None:
        super().__init__(SocketFactory(), endpoint)
        self.obs_t = obs_t

    def answer(self, request: Message) -> Message:
        return Message(kind=KIND_REPLY, seq=request.seq, meta={"op": "infer", "obs_t": self.obs_t},
                       arrays={"action": np.zeros((8, 6), np.float32)})


@pytest.mark.parametrize("obs_t", ["soon", None, True, [1.0], {"t": 1.0}])
def test_a_reply_whose_obs_t_is_not_a_number_is_a_protocol_error_naming_it(obs_t: object) -> None:
    endpoint = free_endpoint()
    server = ObsTServer(endpoint, obs_t)
    server.start()
    client = PolicyClient(SocketFactory(), endpoint, timeout_s=5.0)
    try:
        with pytest.raises(ProtocolError) as info:
            client.infer({"front": np.zeros((4, 4, 3), np.uint8)}, np.zeros(6, np.float32), obs_t=1.0)
        assert info.value.field == "meta.obs_t" and "a number" in info.value.expected
        assert repr(obs_t)[:20] in str(info.value.got)
        server.obs_t = 1.0  # the client keeps serving
        assert client.infer({"front": np.zeros((4, 4, 3), np.uint8)}, np.zeros(6, np.float32), obs_t=1.0).obs_t == 1.0
    finally:
        client.close()
        server.close()
