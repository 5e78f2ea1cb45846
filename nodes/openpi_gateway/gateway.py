"""The gateway's serving side: openpi's WebSocket wire in, the policy node's wire out.

Each WebSocket connection is one session of the policy node (its own client id and REQ socket, run in its
own thread so a slow policy never blocks the event loop or another connection). The connection gets the
metadata on open, then one reply per observation; a bad observation or a policy error is sent as text and
the connection closed, as openpi's ``WebsocketPolicyServer`` does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import http
import itertools
import logging
import ssl
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import websockets
from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from common.config import DeploymentConfig
from common.wire.contract import PolicyContract
from common.wire.openpi import (
    ACTIONS_KEY,
    API_KEY_HEADER,
    API_KEY_SCHEME,
    TIMING_KEY,
    LayoutError,
    ObservationKeys,
    detect_layout,
    packer,
    unpack,
)
from common.wire.policy_client import ChunkReply, PolicyClient
from common.wire.protocol import ProtocolError
from common.wire.transport import PeerUnavailable, RemoteError, SocketFactory

log = logging.getLogger("openpi_gateway")
Array = np.ndarray[Any, Any]

HEALTH_PATH = "/healthz"


def gateway_metadata(contract: PolicyContract, layouts: dict[str, ObservationKeys]) -> dict[str, Any]:
    """What a client gets on connect: openpi's usual fields where armpipe has them, the key layouts this
    gateway accepts, and the policy's whole contract under ``armpipe_contract``."""
    return {
        "server": "armpipe-openpi-gateway",
        "action_horizon": contract.chunk_length,
        "action_dim": len(contract.action_names),
        "fps": contract.fps,
        "policy_type": contract.policy_type,
        "checkpoint_id": contract.checkpoint_id,
        "untrained": contract.untrained,
        "takes_instruction": contract.takes_instruction,
        "layouts": {name: {"images": keys.images, "state": keys.state, "prompt": keys.prompt}
                    for name, keys in layouts.items()},
        "armpipe_contract": contract.to_meta(),
    }


def check_layouts(contract: PolicyContract, layouts: dict[str, ObservationKeys], config: DeploymentConfig) -> list[str]:
    """Every way the configured key layouts cannot feed this policy; empty when they can."""
    problems: list[str] = []
    for name, keys in layouts.items():
        where = f"openpi.gateway.{name}"
        mapped = set(keys.images.values())
        for camera, shape in contract.cameras.items():
            if camera not in mapped:
                problems.append(f"{where}.images: the policy reads camera '{camera}' {shape}, which no key maps to "
                                f"(keys: {keys.images})")
            elif camera not in config.cameras:
                problems.append(f"{where}.images: camera '{camera}' is not in the config's cameras")
        total = sum(keys.state_sizes)
        if total != len(contract.state_names):
            problems.append(f"{where}.state: the keys {keys.state} carry {total} values, the policy's state has "
                            f"{len(contract.state_names)} ({contract.state_names})")
    return problems


def check_api_key(headers: Any, key: str) -> bool:
    """Whether ``Authorization: Api-Key <key>`` is present and right (compared in constant time)."""
    sent = headers.get(API_KEY_HEADER, "") or ""
    scheme, _, value = sent.partition(" ")
    return scheme == API_KEY_SCHEME and hmac.compare_digest(value.strip().encode(), key.encode())


@dataclass
class Session:
    """One connection's policy session: its client id, and the one thread that owns its REQ socket."""

    client_id: str
    executor: concurrent.futures.ThreadPoolExecutor
    client: PolicyClient | None = None
    prompt_ignored: bool = False
    layout: str = ""
    served: int = 0
    prev_total_ms: float | None = None


class Gateway:
    def __init__(self, config: DeploymentConfig, factory: SocketFactory, contract: PolicyContract,
                 layouts: dict[str, ObservationKeys], api_key: str, ssl_context: ssl.SSLContext | None) -> None:
        self.config = config
        self.settings = config.openpi.gateway
        self.factory = factory
        self.contract = contract
        self.layouts = layouts
        self.api_key = api_key
        self.ssl_context = ssl_context
        self.metadata = packer().pack(gateway_metadata(contract, layouts))
        self.shapes = {camera: list(shape) for camera, shape in contract.cameras.items()}
        self.open_connections = 0
        self.counter = itertools.count(1)
        self.served = 0
        self.refused = 0

    # ------------------------------------------------------------------ HTTP before the upgrade
    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == HEALTH_PATH:
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.api_key and not check_api_key(request.headers, self.api_key):
            self.refused += 1
            log.warning("refused %s: missing or wrong API key", connection.remote_address)
            return connection.respond(http.HTTPStatus.UNAUTHORIZED,
                                      f"armpipe openpi gateway: send the API key as '{API_KEY_HEADER}: "
                                      f"{API_KEY_SCHEME} <key>'\n")
        if self.open_connections >= self.settings.max_connections:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                      f"armpipe openpi gateway: {self.settings.max_connections} connections "
                                      "open (openpi.gateway.max_connections)\n")
        return None

    # ------------------------------------------------------------------ one connection
    async def handler(self, websocket: ServerConnection) -> None:
        self.open_connections += 1
        session = Session(client_id=f"openpi-{next(self.counter)}-{uuid.uuid4().hex[:6]}",
                          executor=concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="openpi-session"))
        log.info("connection %s from %s opened", session.client_id, websocket.remote_address)
        loop = asyncio.get_running_loop()
        pack = packer().pack
        try:
            await websocket.send(self.metadata)
            while True:
                data = await websocket.recv()
                start = time.monotonic()
                try:
                    obs_t, images, state, prompt = self._observation(session, data)
                    reply = await loop.run_in_executor(session.executor, self._infer, session, images, state,
                                                       obs_t, prompt)
                except ProtocolError as exc:
                    await self._fail(websocket, session, f"observation refused: {exc}", CloseCode.INVALID_DATA)
                    return
                except (RemoteError, PeerUnavailable) as exc:
                    await self._fail(websocket, session, f"the policy node failed: {exc}", CloseCode.INTERNAL_ERROR)
                    return
                infer_ms = reply.round_trip_s * 1000
                timing: dict[str, float] = {"infer_ms": infer_ms}
                if session.prev_total_ms is not None:
                    timing["prev_total_ms"] = session.prev_total_ms
                out = {ACTIONS_KEY: np.ascontiguousarray(reply.actions, dtype=np.float32), TIMING_KEY: timing,
                       "policy_timing": {f"{name.removesuffix('_s')}_ms": value * 1000
                                         for name, value in reply.timings.items()}}
                await websocket.send(pack(out))
                session.served += 1
                self.served += 1
                session.prev_total_ms = (time.monotonic() - start) * 1000
        except websockets.ConnectionClosed:
            pass
        except Exception as exc:  # anything else: said to the client as openpi does, the gateway keeps serving
            log.exception("connection %s failed", session.client_id)
            await self._fail(websocket, session, f"internal error: {type(exc).__name__}: {exc}",
                             CloseCode.INTERNAL_ERROR)
        finally:
            self.open_connections -= 1
            log.info("connection %s closed after %d chunk(s)", session.client_id, session.served)
            session.executor.submit(self._close_client, session)
            session.executor.shutdown(wait=False)

    def _observation(self, session: Session, data: str | bytes) -> tuple[float, dict[str, Array], Array, str | None]:
        obs_t = time.monotonic()
        if isinstance(data, str):
            raise ProtocolError("message", "a binary msgpack observation", "a text message")
        obs = unpack(data, "observation")
        layout = session.layout or detect_layout(obs)
        keys = self.layouts.get(layout)
        if keys is None or keys.missing(obs):
            raise LayoutError(self._expected(), self._got(obs, keys))
        images, state, prompt = keys.parse(obs, self.shapes)
        session.layout = layout  # a connection keeps the layout of its first observation
        return obs_t, images, state, prompt

    def _expected(self) -> str:
        return "the key layout " + " or ".join(keys.describe() for keys in self.layouts.values())

    @staticmethod
    def _got(obs: dict[str, Any], keys: ObservationKeys | None) -> str:
        top = sorted(obs)
        missing = keys.missing(obs) if keys is not None else []
        nested = {name: sorted(obs[name]) for name in ("images", "states") if isinstance(obs.get(name), dict)}
        return (f"keys {top}{f' {nested}' if nested else ''}" + (f", missing {missing}" if missing else "")
                + ("" if keys is not None else f" ({detect_layout(obs)} layout, not accepted here: "
                                               "openpi.gateway.layouts)"))

    def _infer(self, session: Session, images: dict[str, Array], state: Array, obs_t: float,
               prompt: str | None) -> ChunkReply:
        if session.client is None:
            session.client = PolicyClient(self.factory, self.config.policy.endpoint, client_id=session.client_id,
                                          timeout_s=self.settings.timeout_s, retries=1)
        if prompt is not None and not self.contract.takes_instruction and not session.prompt_ignored:
            log.info("connection %s: this %s policy takes no instruction; its prompt %r is passed on and ignored",
                     session.client_id, self.contract.policy_type, prompt[:80])
            session.prompt_ignored = True
        return session.client.infer(images, state, obs_t, instruction=prompt)

    @staticmethod
    def _close_client(session: Session) -> None:
        if session.client is not None:
            session.client.close()
            session.client = None

    async def _fail(self, websocket: ServerConnection, session: Session, text: str, code: CloseCode) -> None:
        log.warning("connection %s: %s", session.client_id, text)
        try:
            await websocket.send(f"armpipe openpi gateway: {text}")
            await websocket.close(code=code, reason=text[:120].encode("utf-8")[:120].decode("utf-8", "ignore"))
        except websockets.ConnectionClosed:
            pass
