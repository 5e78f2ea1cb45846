"""Client side of the policy node's request/reply protocol (used by the actuator, bench and tests)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.wire.contract import RTC_DELAY_KEY, RTC_GUIDE_KEY, RTC_PREFIX_KEY, STATE_KEY, PolicyContract, image_key
from common.wire.images import JpegImage
from common.wire.protocol import INSTRUCTION_KEY, KIND_REQUEST, Message, ProtocolError, check_instruction
from common.wire.transport import RequestClient, SocketFactory


@dataclass
class ChunkReply:
    actions: np.ndarray  # (chunk_length, action_dim) float32, robot units
    obs_t: float  # the observation time echoed back (client's monotonic clock)
    timings: dict[str, float] = field(default_factory=dict)  # server durations, seconds
    received_t: float = 0.0  # client's monotonic clock: the reply was read (the latency chain's replied_t)
    sent_t: float = 0.0  # client's monotonic clock just before the request was encoded and sent (the chain's sent_t)
    # rtc: the rows predicted after the chunk (guide_rows, action_dim), robot units; None when the reply has none
    guide: np.ndarray | None = None
    batch: int = 1  # the requests that ran in the same model call on the policy node (meta.batch; 1 when absent)

    @property
    def round_trip_s(self) -> float:
        """The round trip, from the one pair of instants the latency chain also reports (sent_t -> received_t)."""
        return self.received_t - self.sent_t


def echoed_obs_t(meta: Mapping[str, object], sent: float) -> float:
    """A reply's ``meta.obs_t`` (the sent one when absent): a number, else a ``ProtocolError`` naming it."""
    value = meta.get("obs_t", sent)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError("meta.obs_t", "the observation time the request sent (a number)", value)
    return float(value)


def _batch_size(meta: Mapping[str, object]) -> int:
    value = meta.get("batch", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1


class PolicyClient:
    def __init__(self, factory: SocketFactory, endpoint: str, *, client_id: str = "", timeout_s: float = 2.0,
                 retries: int = 1) -> None:
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:8]}"
        self.requests = RequestClient(factory, endpoint, timeout_s=timeout_s, retries=retries)

    def _request(self, op: str, *, arrays: dict[str, np.ndarray] | None = None, meta: dict | None = None,
                 jpeg: set[str] | None = None, jpeg_quality: Mapping[str, int] | None = None,
                 timeout_s: float | None = None, jpeg_shapes: dict[str, tuple[int, int, int]] | None = None) -> Message:
        msg = Message(kind=KIND_REQUEST, src=self.client_id, meta={"op": op, "client": self.client_id, **(meta or {})},
                      arrays=arrays or {}, jpeg=jpeg or set(), jpeg_shapes=jpeg_shapes or {})
        return self.requests.request(msg, timeout_s=timeout_s, jpeg_quality=jpeg_quality or {})

    def metadata(self, timeout_s: float | None = None) -> PolicyContract:
        return PolicyContract.from_meta(self._request("metadata", timeout_s=timeout_s).meta["contract"])

    def ping(self, timeout_s: float | None = None) -> float:
        start = time.monotonic()
        self._request("ping", timeout_s=timeout_s)
        return time.monotonic() - start

    def capacity(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The policy node's capacity figures of its last period (a ``ping`` reply's ``meta.capacity``:
        ``chunks_per_s``, ``sessions``, batch sizes, queue wait; docs/protocol.md section 5); None from a
        server that does not send them."""
        figures = self._request("ping", timeout_s=timeout_s).meta.get("capacity")
        return figures if isinstance(figures, dict) else None

    def reset(self, timeout_s: float | None = None) -> None:
        self._request("reset", timeout_s=timeout_s)

    def infer(self, images: Mapping[str, np.ndarray | JpegImage], state: np.ndarray, obs_t: float, *,
              jpeg: bool | Mapping[str, int] = False, timeout_s: float | None = None,
              rtc_prefix: np.ndarray | None = None, rtc_delay_rows: int = 0,
              instruction: str | None = None) -> ChunkReply:
        """Ask for one action chunk. ``images`` maps camera name -> uint8 HxWx3 RGB, or a ``JpegImage``.

        A ``JpegImage`` goes out as the very bytes it holds (a camera's JPEG is never decoded and encoded
        again). A raw image goes out raw, unless ``jpeg`` asks for JPEG: ``True`` for every raw image at
        quality 90, or a mapping camera -> JPEG quality for those cameras only.

        ``rtc_prefix`` (rows, action_dim), robot units: the actions meant for ``obs_t + k / fps`` that ran or
        will run while this chunk is computed; the chunk continues them (its first ``rtc_delay_rows`` rows
        are these rows). Only for a policy whose contract has ``extra.rtc_max_prefix_rows`` > 0.

        ``instruction``: the task in words (UTF-8, 1..512 bytes), sent as ``meta.instruction``; a policy whose
        contract has ``takes_instruction`` refuses a request without one, the others ignore it. A bad one
        raises ``ProtocolError`` here, before anything is sent.
        """
        arrays: dict[str, np.ndarray] = {}
        as_jpeg: set[str] = set()
        qualities: dict[str, int] = {}
        shapes: dict[str, tuple[int, int, int]] = {}
        for name, image in images.items():
            key = image_key(name)
            if isinstance(image, JpegImage):
                arrays[key] = image.payload
                shapes[key] = image.shape
                as_jpeg.add(key)
            else:
                arrays[key] = image
                if jpeg is True or (not isinstance(jpeg, bool) and name in jpeg):
                    as_jpeg.add(key)
                    qualities[key] = 90 if jpeg is True else int(jpeg[name])
        arrays[STATE_KEY] = np.asarray(state, dtype=np.float32)
        meta: dict = {"obs_t": float(obs_t)}
        if instruction is not None:
            meta[INSTRUCTION_KEY] = check_instruction({INSTRUCTION_KEY: instruction}, required=True)
        if rtc_prefix is not None and len(rtc_prefix):
            arrays[RTC_PREFIX_KEY] = np.ascontiguousarray(rtc_prefix, dtype=np.float32)
            meta[RTC_DELAY_KEY] = int(min(max(rtc_delay_rows, 0), len(rtc_prefix)))
        start = time.monotonic()
        reply = self._request("infer", arrays=arrays, meta=meta, jpeg=as_jpeg, jpeg_quality=qualities,
                              timeout_s=timeout_s, jpeg_shapes=shapes)
        received = time.monotonic()
        actions = reply.arrays.get("action")
        if actions is None or actions.ndim != 2 or actions.dtype != np.float32:
            raise ProtocolError("arrays[action]", "a float32 (n, action_dim) chunk",
                                None if actions is None else f"{actions.dtype}{actions.shape}")
        guide = reply.arrays.get(RTC_GUIDE_KEY)
        if guide is not None:
            expected = f"finite float32 (rows, {actions.shape[1]}) guidance rows"
            if guide.ndim != 2 or guide.dtype != np.float32 or guide.shape[1] != actions.shape[1]:
                raise ProtocolError(f"arrays[{RTC_GUIDE_KEY}]", expected, f"{guide.dtype}{guide.shape}")
            if not np.all(np.isfinite(guide)):
                raise ProtocolError(f"arrays[{RTC_GUIDE_KEY}]", expected, "non-finite values")
        return ChunkReply(actions=actions, obs_t=echoed_obs_t(reply.meta, obs_t),
                          timings=dict(reply.meta.get("timings", {})), received_t=received, sent_t=start,
                          guide=guide if guide is not None and len(guide) else None,
                          batch=_batch_size(reply.meta))

    def close(self) -> None:
        self.requests.close()
