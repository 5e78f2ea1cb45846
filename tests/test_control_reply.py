"""The actuator's control handler answers every request, even one whose reply the wire cannot carry.

A reply over the protocol's header limit (the recorder's ``backlog`` op once built one) used to raise out of
``ControlHandler._handle_control`` and end the actuator. Here the real handler serves a real ROUTER socket and a
real ``ActuatorClient``; only the op's reply is made too large on purpose.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from conftest import free_endpoint

from common.wire.actuator_client import ActuatorClient
from common.wire.protocol import MAX_HEADER_BYTES
from common.wire.transport import RemoteError, RouterServer, SocketFactory
from nodes.actuator.control import ControlHandler


class OversizedStatus(ControlHandler):
    """The control mixin on its own socket, with a ``status`` whose reply is larger than any header may be."""

    def __init__(self, factory: SocketFactory, endpoint: str) -> None:
        self.control = RouterServer(factory, endpoint)
        self.oversized = True

    def _op_status(self, meta: dict[str, Any]) -> dict[str, Any]:
        del meta
        return {"blob": "x" * (MAX_HEADER_BYTES + 1)} if self.oversized else {"state": "idle"}


def test_a_reply_too_large_for_the_wire_is_answered_as_an_error_and_the_handler_serves_on() -> None:
    factory = SocketFactory()
    endpoint = free_endpoint()
    ops = OversizedStatus(factory, endpoint)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if (request := ops.control.receive(0.05)) is not None:
                ops._handle_control(*request)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    client = ActuatorClient(factory, endpoint, client="test", timeout_s=2.0, retries=1)
    try:
        with pytest.raises(RemoteError) as refused:
            client.send("status")
        assert refused.value.field == "header" and str(MAX_HEADER_BYTES) in refused.value.expected
        assert server.is_alive(), "the control handler died on a reply it could not encode"
        ops.oversized = False
        assert client.send("status").meta["state"] == "idle"
    finally:
        stop.set()
        server.join(timeout=5)
        client.close()
        ops.control.close()
