"""The robot side's client of an openpi-compatible policy server (``policy.backend: openpi``).

Same interface as ``common.wire.policy_client.PolicyClient`` (``metadata() -> PolicyContract``, ``reset()``,
``infer(...) -> ChunkReply``, ``close()``), so the actuator's policy worker uses either. It speaks openpi's
WebSocket wire (``common.wire.openpi``) to ``openpi.server.endpoint``: openpi's ``serve_policy``, armpipe's own
openpi gateway, or any server that answers ``openpi-client``'s ``WebsocketClientPolicy``.

What such a server cannot give, and how it is covered (said once, when the contract is first built):

- no contract: it is built from the server's metadata (``action_horizon``, ``action_dim``, ``fps`` where
  present) plus the config (cameras and joints, ``openpi.server.chunk_length``), and checked as any other;
- no echo of the observation time: each chunk is timed from the observation this client sent;
- no real-time chunking prefixes: the contract says ``rtc_max_prefix_rows: 0``, so ``overlap: rtc`` is refused;
- only ``server_timing.infer_ms`` per request: it stands for the policy's inference and its whole server time in
  the latency chain; the server's decode and encode count into ``network``.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import websockets
import websockets.sync.client
from websockets.exceptions import InvalidStatus

from common.config import ConfigError, DeploymentConfig
from common.wire.contract import PolicyContract
from common.wire.images import JpegImage, decode_jpeg
from common.wire.openpi import (
    ACTIONS_KEY,
    API_KEY_HEADER,
    API_KEY_SCHEME,
    TIMING_KEY,
    ObservationKeys,
    packer,
    read_api_key,
    unpack,
)
from common.wire.policy_client import ChunkReply
from common.wire.protocol import ProtocolError
from common.wire.transport import PeerUnavailable

log = logging.getLogger("armpipe.openpi")

MAX_REPLY_BYTES = 64 << 20
LIMITATIONS = ("no real-time chunking prefixes (overlap: rtc is refused; replace and blend work)",
               "no echo of the observation time (each chunk is timed from the observation sent)",
               "per request only server_timing.infer_ms (the latency chain counts the server's decode and encode "
               "into 'network')")


class OpenpiServerError(RuntimeError):
    """The server answered with an error text (then closed the connection), or refused the connection."""


class OpenpiPolicyClient:
    """One WebSocket to an openpi-compatible server; one request at a time (the actuator's policy worker)."""

    def __init__(self, config: DeploymentConfig, *, client_id: str = "", timeout_s: float | None = None,
                 retries: int | None = None) -> None:
        self.config = config
        self.settings = config.openpi.server
        self.endpoint = self.settings.endpoint
        self.client_id = client_id or f"openpi-client-{uuid.uuid4().hex[:8]}"
        self.timeout_s = config.policy.timeout_s if timeout_s is None else timeout_s
        self.attempts = max(1, config.policy.retries if retries is None else retries)
        self.keys = ObservationKeys.from_config(config, self.settings.layout, self.settings.keys,
                                                self.settings.prompt_key)
        self._ws: websockets.sync.client.ClientConnection | None = None
        self.server_metadata: dict[str, Any] = {}
        self._said_limitations = False
        self._pack = packer().pack
        self._setup_error = ""
        self._api_key = ""
        self._ssl: ssl.SSLContext | None = None
        try:
            if self.settings.api_key_file:
                self._api_key = read_api_key(self.settings.api_key_file, "openpi.server.api_key_file", config)
            if self.endpoint.startswith("wss://"):
                self._ssl = ssl.create_default_context(
                    cafile=str(config.resolve(self.settings.ca_file)) if self.settings.ca_file else None)
        except (ConfigError, OSError, ssl.SSLError) as exc:
            self._setup_error = f"openpi.server: {exc}"
            log.error("%s", self._setup_error)

    # ------------------------------------------------------------------ connection
    def _connect(self) -> websockets.sync.client.ClientConnection:
        if self._setup_error:
            raise OpenpiServerError(self._setup_error)
        if self._ws is not None:
            return self._ws
        headers = {API_KEY_HEADER: f"{API_KEY_SCHEME} {self._api_key}"} if self._api_key else None
        try:
            ws = websockets.sync.client.connect(self.endpoint, additional_headers=headers, ssl=self._ssl,
                                                compression=None, max_size=MAX_REPLY_BYTES,
                                                open_timeout=self.settings.connect_timeout_s, legacy=True)
        except InvalidStatus as exc:
            status = exc.response.status_code
            body = bytes(exc.response.body or b"").decode("utf-8", "replace").strip()
            raise OpenpiServerError(f"{self.endpoint} refused the connection: HTTP {status}"
                                    f"{' (check openpi.server.api_key_file)' if status in (401, 403) else ''}"
                                    f"{': ' + body[:200] if body else ''}") from exc
        except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
            raise PeerUnavailable(self.endpoint, 1, self.settings.connect_timeout_s,
                                  f"{type(exc).__name__}: {exc}") from exc
        try:
            first = ws.recv(timeout=self.settings.connect_timeout_s)
            if isinstance(first, str):
                raise OpenpiServerError(f"{self.endpoint} sent text instead of its metadata: {first[:300]}")
            self.server_metadata = unpack(first, "metadata")
        except (TimeoutError, websockets.ConnectionClosed) as exc:
            ws.close()
            raise PeerUnavailable(self.endpoint, 1, self.settings.connect_timeout_s,
                                  f"no metadata after connecting ({type(exc).__name__})") from exc
        except Exception:
            ws.close()
            raise
        self._ws = ws
        return ws

    def _drop(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    # ------------------------------------------------------------------ the PolicyClient interface
    def metadata(self, timeout_s: float | None = None) -> PolicyContract:
        """The contract: the server's metadata (read on connect) plus the config."""
        self._connect()
        contract = self.contract_of(self.server_metadata)
        if not self._said_limitations:
            log.warning("policy.backend openpi (%s): an openpi server has %s", self.endpoint, "; ".join(LIMITATIONS))
            self._said_limitations = True
        return contract

    def contract_of(self, metadata: Mapping[str, Any]) -> PolicyContract:
        config, settings = self.config, self.settings
        problems: list[str] = []
        horizon = _int(metadata.get("action_horizon"))
        if horizon and settings.chunk_length and horizon != settings.chunk_length:
            problems.append(f"openpi.server.chunk_length: {settings.chunk_length}, the server's metadata says "
                            f"action_horizon {horizon}")
        chunk = horizon or settings.chunk_length
        if not chunk:
            problems.append("openpi.server.chunk_length: the server's metadata has no action_horizon; set the rows "
                            "per chunk it returns")
        actions = config.action_names()
        action_dim = _int(metadata.get("action_dim"))
        if action_dim and action_dim != len(actions):
            actions = [f"action[{index}]" for index in range(action_dim)]
        fps = _int(metadata.get("fps")) or config.fps
        sent = set(self.keys.images.values())
        cameras = {camera: shape for camera, shape in config.image_shapes().items() if camera in sent}
        digest = hashlib.sha256(self._pack(dict(metadata))).hexdigest()[:16]
        checkpoint_id = str(metadata.get("checkpoint_id") or f"openpi-{digest}")
        return PolicyContract(
            policy_type=f"openpi:{metadata.get('policy_type', 'server')}", cameras=cameras,
            state_names=config.state_names(), action_names=actions, chunk_length=max(chunk, 0), n_obs_steps=1,
            fps=fps, checkpoint_id=checkpoint_id, checkpoint_path=self.endpoint,
            untrained=bool(metadata.get("untrained", False)), device="remote",
            takes_instruction=metadata.get("takes_instruction") is True,
            extra={"backend": "openpi", "rtc_max_prefix_rows": 0, "layout": self.keys.layout,
                   "limitations": list(LIMITATIONS), "problems": problems})

    def reset(self, timeout_s: float | None = None) -> None:
        """A new session: openpi's servers keep one per connection, so the connection is opened again."""
        self._drop()
        self._connect()

    def ping(self, timeout_s: float | None = None) -> float:
        start = time.monotonic()
        self._connect()
        return time.monotonic() - start

    def infer(self, images: Mapping[str, np.ndarray | JpegImage], state: np.ndarray, obs_t: float, *,
              jpeg: bool | Mapping[str, int] = False, timeout_s: float | None = None,
              rtc_prefix: np.ndarray | None = None, rtc_delay_rows: int = 0,
              instruction: str | None = None) -> ChunkReply:
        """One chunk for this observation. ``jpeg`` is ignored (openpi's wire carries raw arrays: a camera's JPEG
        is decoded here); ``rtc_prefix`` cannot be sent (the contract says so, ``overlap: rtc`` is refused)."""
        if rtc_prefix is not None and len(rtc_prefix):
            raise ValueError("an openpi server cannot continue an rtc prefix (the contract says "
                             "rtc_max_prefix_rows: 0)")
        raw = {name: decode_jpeg(image.payload, f"images[{name}]") if isinstance(image, JpegImage) else image
               for name, image in images.items()}
        data = self._pack(self.keys.build(raw, state, instruction))
        wait = self.timeout_s if timeout_s is None else timeout_s
        why = ""
        for _ in range(self.attempts):
            ws = self._connect()
            start = time.monotonic()
            try:
                ws.send(data)
                reply = ws.recv(timeout=wait)
            except TimeoutError:
                why = f"no reply within {wait:.2f}s"
                self._drop()  # a late reply would answer the next observation
                continue
            except websockets.ConnectionClosed as exc:
                why = f"the server closed the connection ({exc})"
                self._drop()
                continue
            received = time.monotonic()
            if isinstance(reply, str):
                self._drop()
                raise OpenpiServerError(f"{self.endpoint}: {reply.strip()[-1500:]}")
            return self._chunk(reply, obs_t, start, received)
        raise PeerUnavailable(self.endpoint, self.attempts, wait, why)

    def _chunk(self, data: bytes, obs_t: float, sent_t: float, received_t: float) -> ChunkReply:
        reply = unpack(data, "reply")
        actions = reply.get(ACTIONS_KEY)
        expected = "a (rows, action_dim) array of numbers"
        if not isinstance(actions, np.ndarray) or actions.ndim != 2 or actions.dtype.kind not in "fiu":
            got = (f"{actions.dtype}{list(actions.shape)}" if isinstance(actions, np.ndarray)
                   else type(actions).__name__)
            raise ProtocolError(ACTIONS_KEY, expected, got)
        timing = reply.get(TIMING_KEY)
        infer_ms = timing.get("infer_ms") if isinstance(timing, dict) else None
        timings: dict[str, float] = {}
        if isinstance(infer_ms, int | float) and not isinstance(infer_ms, bool) and np.isfinite(infer_ms):
            infer_s = float(infer_ms) / 1000
            timings = {"unpack_s": 0.0, "decode_s": 0.0, "preprocess_s": 0.0, "inference_s": infer_s,
                       "postprocess_s": 0.0, "total_s": infer_s, "server_s": infer_s}
        return ChunkReply(actions=np.ascontiguousarray(actions, dtype=np.float32), obs_t=float(obs_t),
                          timings=timings, received_t=received_t, sent_t=sent_t)

    def close(self) -> None:
        self._drop()


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | np.integer) and not isinstance(value, bool) else 0
