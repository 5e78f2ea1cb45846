"""The actuator's control socket, from the client side: one client for the monitor's buttons, offline
evaluation's ``--drive`` and the tests.

The ops are ``protocol.CONTROL_OPS`` (``start`` with an optional ``episode_index``, ``stop`` with an
optional ``label``, ``label``, ``status``, ``instruction`` with ``text``); docs/protocol.md has their fields.
Each request goes out on one REQ socket with Lazy Pirate retries (``transport.RequestClient``). An op the
actuator refuses raises ``RemoteError`` (its ``field`` and ``expected`` say why), an actuator that does not
answer ``PeerUnavailable``, a malformed reply ``ProtocolError``.
"""

from __future__ import annotations

from typing import Any

from common.wire.protocol import KIND_REQUEST, Message
from common.wire.transport import RequestClient, SocketFactory


class ActuatorClient:
    """Requests to one actuator's control endpoint; ``client`` names the sender in each request."""

    def __init__(self, factory: SocketFactory, endpoint: str, *, client: str, timeout_s: float = 2.0,
                 retries: int = 3) -> None:
        self.endpoint = endpoint
        self.client = client
        self._requests = RequestClient(factory, endpoint, timeout_s=timeout_s, retries=retries)

    def send(self, op: str, **meta: Any) -> Message:
        """Send one control op and return the actuator's reply."""
        request = Message(kind=KIND_REQUEST, src=self.client, meta={"op": op, "client": self.client, **meta})
        return self._requests.request(request)

    def set_instruction(self, text: str) -> Message:
        """Change the task instruction a language policy gets (op ``instruction``, ``meta.text``: UTF-8, 1..512
        bytes) between episodes; the reply carries the ``instruction`` now in effect. During an episode, or for a
        text that is not one, the actuator refuses: ``RemoteError`` naming ``meta.op`` or ``meta.text``."""
        return self.send("instruction", text=text)

    def close(self) -> None:
        self._requests.close()
