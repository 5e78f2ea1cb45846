"""ZeroMQ sockets for armpipe: latest-only PUB/SUB, a Lazy Pirate request client, a ROUTER server.

Every socket is made by ``SocketFactory.socket`` so that options (high-water marks, linger, maximum
message size) and CURVE authentication (``common.wire.curve``) are set in exactly one place.

Two libzmq facts shape this module:
- ``ZMQ_CONFLATE`` aborts the process on multipart messages, so "latest only" is done with small
  high-water marks plus draining the socket and keeping the newest message per stream.
- A REQ socket whose reply is lost is stuck forever, so ``RequestClient`` follows the ZeroMQ guide's
  Lazy Pirate pattern: poll with a timeout, close with linger 0, reconnect, retry a bounded number of
  times, then report the peer as unavailable.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from common.wire.curve import (
    CurveAuthenticator,
    CurveKeys,
    HandshakeWatch,
    RefusalLog,
    apply_client_curve,
    apply_server_curve,
)
from common.wire.protocol import (
    KIND_ERROR,
    KIND_FRAME,
    KIND_STATE,
    MAX_MESSAGE_BYTES,
    Message,
    ProtocolError,
    decode,
    encode,
)

log = logging.getLogger(__name__)

# Kinds whose publisher stamps ``meta.pub_t``: the sensor streams the latency chain starts from.
STAMPED_KINDS = (KIND_FRAME, KIND_STATE)


# libzmq retries a dropped connection within its reconnect interval (100 ms) and says so at once
# (EVENT_CONNECT_RETRIED); a drop not followed by that within this grace is one it will never retry.
RETRY_GRACE_S = 0.1
DROPPED_REASON = (f"the publisher was dropped by libzmq and not retried: it sent a message with a frame over "
                  f"MAXMSGSIZE ({MAX_MESSAGE_BYTES >> 20} MiB) or broke the ZMTP protocol")

DROPPED_REPLY_REASON = (f"libzmq dropped the server's connection without retrying: its reply had a frame over "
                        f"MAXMSGSIZE ({MAX_MESSAGE_BYTES >> 20} MiB) or broke the ZMTP protocol")
RETRY_EVENT_GRACE_MS = 200
LEFT_REASON = ("the server closed the connection while the request was in flight (it stopped, crashed or "
               "restarted; a policy standby takes over at once)")
UNSENT_REASON = ("the request could not be sent: no connection to the server completed its handshake "
                 "(server down, or the two sides disagree on CURVE keys)")


@dataclass(frozen=True)
class Reconnect:
    """One endpoint a subscriber reconnected by itself, and why."""

    endpoint: str
    reason: str


class PeerUnavailable(ConnectionError):
    """The peer did not answer within the timeout after every retry."""

    def __init__(self, endpoint: str, attempts: int, timeout_s: float, why: str = "") -> None:
        self.endpoint = endpoint
        self.why = why
        super().__init__(f"no reply from {endpoint} after {attempts} attempt(s) of {timeout_s:.2f}s each"
                         + (f" ({why})" if why else ""))


class RemoteError(RuntimeError):
    """The peer answered with an ``error`` message; ``field`` and ``expected`` say what was wrong."""

    def __init__(self, reply: Message) -> None:
        self.reply = reply
        self.field = str(reply.meta.get("field", ""))
        self.expected = str(reply.meta.get("expected", ""))
        super().__init__(str(reply.meta.get("message", "remote error")))


class SocketFactory:
    """The one place where sockets are created and configured.

    With ``curve`` set, every socket it makes is CURVE-encrypted (see ``common.wire.curve``): sockets made
    with ``server=True`` are CURVE servers whose clients pyzmq's ZAP authenticator checks against
    ``curve.allowed_clients_dir`` (started with the first such socket; refusals go to ``refusals``),
    and the others are CURVE clients of ``curve.server_public``. A factory is for one side of one link:
    a node that also has loopback sockets makes those with a plain factory.
    """

    def __init__(self, context: zmq.Context | None = None, curve: CurveKeys | None = None) -> None:
        self.context = context or zmq.Context.instance()
        self.curve = curve
        self.refusals = RefusalLog()
        self.authenticator: CurveAuthenticator | None = None

    def socket(self, socket_type: int, *, hwm: int = 16, linger_ms: int = 0, server: bool = False) -> zmq.Socket:
        sock = self.context.socket(socket_type)
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        # libzmq drops (and disconnects) any peer whose single frame exceeds this: a cheap first bound.
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        if self.curve is not None:
            self._apply_curve(sock, server=server)
        return sock

    def _apply_curve(self, sock: zmq.Socket, *, server: bool) -> None:
        keys = self.curve
        assert keys is not None
        if not server:
            apply_client_curve(sock, keys)
            return
        if self.authenticator is None:
            # One ZAP handler per context (it binds inproc://zeromq.zap.01), before any peer can connect.
            self.authenticator = CurveAuthenticator(self.context, keys.allowed_clients_dir, self.refusals)
            self.authenticator.start()
            self.authenticator.reload()
        apply_server_curve(sock, keys)
        HandshakeWatch(sock, self.refusals).start()

    def close(self) -> None:
        """Stop the authenticator, and terminate the context if this factory owns a non-global one."""
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None
        if self.context is not zmq.Context.instance():
            self.context.term()


def send_message(sock: zmq.Socket, msg: Message, *, prefix: Iterable[Any] = (), flags: int = 0,
                 **encode_options: Any) -> None:
    """Encode and send ``msg`` without copying its arrays. ``prefix`` frames (ROUTER envelopes) go first."""
    sock.send_multipart([*prefix, *encode(msg, **encode_options)], flags=flags, copy=False)


def recv_message(sock: zmq.Socket, flags: int = 0) -> Message:
    """Receive and decode one message; raises ``ProtocolError`` for a malformed one."""
    return decode(sock.recv_multipart(flags=flags, copy=False))


class Publisher:
    """A bound PUB socket that stamps messages with ``src`` and a per-publisher sequence number."""

    def __init__(self, factory: SocketFactory, endpoint: str, src: str, *, hwm: int = 4) -> None:
        self.src = src
        self.endpoint = endpoint
        self.seq = 0
        self.sock = factory.socket(zmq.PUB, hwm=hwm, server=True)
        self.sock.bind(endpoint)

    def publish(self, msg: Message, **encode_options: Any) -> Message:
        self.seq += 1
        msg.src = msg.src or self.src
        msg.seq = self.seq
        if msg.kind in STAMPED_KINDS:
            # The latency chain's "published" stage (docs/protocol.md, latency): sensor data only, stamped
            # just before encoding, so a JPEG frame's compression counts in its transport stage.
            msg.meta["pub_t"] = time.monotonic()
        # NOBLOCK: a PUB socket never blocks anyway (it drops at the HWM), but be explicit about it.
        send_message(self.sock, msg, flags=zmq.NOBLOCK, **encode_options)
        return msg

    def close(self) -> None:
        self.sock.close(linger=0)


class LatestSubscriber:
    """A SUB socket connected to several publishers, read by draining to the newest messages.

    Malformed messages are logged and counted in ``bad_messages``, never raised: one bad publisher
    must not take down the subscriber.

    A publisher that sends one frame over ``MAXMSGSIZE`` is dropped by libzmq (``EVENT_DISCONNECTED``)
    and, unlike a publisher that went away, never retried (no ``EVENT_CONNECT_RETRIED`` follows): the
    stream would be gone until a restart. A socket monitor watches for exactly that and reconnects the
    endpoint; each such recovery is kept in ``reconnects`` (for the owner's events) and counted.
    """

    def __init__(self, factory: SocketFactory, endpoints: Iterable[str], *, hwm: int = 4) -> None:
        self.sock = factory.socket(zmq.SUB, hwm=hwm)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.endpoints = list(endpoints)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)
        for endpoint in self.endpoints:
            self.sock.connect(endpoint)
        self.bad_messages = 0
        self.last_error: ProtocolError | None = None
        self._dropped: dict[str, float] = {}  # endpoint -> when libzmq dropped it without retrying (yet)
        self.reconnects: list[Reconnect] = []  # recoveries not yet taken by the owner (take_reconnects)
        self.reconnect_count = 0

    def poll(self, timeout_s: float = 0.0, max_messages: int = 1000) -> list[Message]:
        """Wait up to ``timeout_s`` for a message, then drain everything queued, oldest first."""
        self.maintain()
        messages: list[Message] = []
        if not self.sock.poll(int(timeout_s * 1000)):
            return messages
        while len(messages) < max_messages:
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                messages.append(decode(frames))
            except ProtocolError as exc:
                self.bad_messages += 1
                self.last_error = exc
                log.warning("dropped malformed message: %s", exc)
        return messages

    def maintain(self) -> None:
        """Read the socket monitor and reconnect every endpoint that libzmq dropped for good."""
        now = time.monotonic()
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            endpoint = event["endpoint"].decode(errors="replace")
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._dropped.setdefault(endpoint, now)
            elif event["event"] == zmq.EVENT_CONNECT_RETRIED:
                self._dropped.pop(endpoint, None)  # an ordinary disconnect: libzmq reconnects by itself
        for endpoint, since in list(self._dropped.items()):
            if now - since < RETRY_GRACE_S:
                continue
            del self._dropped[endpoint]
            with contextlib.suppress(zmq.ZMQError):  # libzmq may already have forgotten the endpoint
                self.sock.disconnect(endpoint)
            self.sock.connect(endpoint)
            self.reconnect_count += 1
            recovery = Reconnect(endpoint=endpoint, reason=DROPPED_REASON)
            self.reconnects.append(recovery)
            log.warning("reconnected to %s: %s", endpoint, recovery.reason)

    def take_reconnects(self) -> list[Reconnect]:
        taken, self.reconnects = self.reconnects, []
        return taken

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


class RequestClient:
    """A REQ client that survives lost replies and dead servers (the ZeroMQ guide's Lazy Pirate)."""

    def __init__(self, factory: SocketFactory, endpoint: str, *, timeout_s: float = 1.0,
                 retries: int = 3) -> None:
        self.factory = factory
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.retries = max(1, retries)
        self.seq = 0
        self.sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self.last_failure = ""  # why the last attempt got no reply, when known
        self._events: list[int] = []  # the monitor's events during the current attempt
        self._poller: zmq.Poller | None = None
        self._connect()

    def _connect(self) -> None:
        self._close_socket()
        self.sock = self.factory.socket(zmq.REQ, hwm=2)
        # Watched to end an attempt whose server went away (its reply cannot come), and to say why: a
        # reply over MAXMSGSIZE makes libzmq drop the server without retrying.
        self._monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)
        self._poller = zmq.Poller()  # the reply, or the monitor saying the server went away
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self.sock.connect(self.endpoint)

    def _drain_events(self) -> None:
        """Move the monitor's queued events into this attempt's list."""
        while self._monitor is not None and self._monitor.poll(0):
            self._events.append(recv_monitor_message(self._monitor)["event"])

    def _dropped_for_good(self) -> bool:
        """Whether libzmq dropped the server during this attempt and did not retry it."""
        self._drain_events()
        dropped = False
        for event in self._events:
            dropped = event == zmq.EVENT_DISCONNECTED or (dropped and event != zmq.EVENT_CONNECT_RETRIED)
        return dropped

    def _reply_or_gone(self, remaining_s: float) -> bool:
        """Wait up to ``remaining_s`` for the reply or for the server to drop the connection (True for
        either; ``last_failure`` says which). A server that ends closes its TCP connection, so the client
        need not sit out its whole timeout for a reply that cannot come: with a policy standby the next
        attempt is served at once."""
        assert self.sock is not None and self._poller is not None
        ready = dict(self._poller.poll(int(remaining_s * 1000) + 1))
        if self.sock in ready:
            return True
        self._drain_events()
        if zmq.EVENT_DISCONNECTED not in self._events:
            return False
        # libzmq schedules a reconnect at once for a server that went away, and none for a connection it
        # dropped itself (a reply over MAXMSGSIZE): give the retry event a moment to tell the two apart.
        if self._monitor is not None and self._monitor.poll(RETRY_EVENT_GRACE_MS):
            self._drain_events()
        self.last_failure = DROPPED_REPLY_REASON if self._dropped_for_good() else LEFT_REASON
        return True

    def _send_before(self, deadline: float, msg: Message, encode_options: dict[str, Any]) -> bool:
        """Send ``msg`` once a connection can take it, before ``deadline``; False if none could."""
        assert self.sock is not None
        while (remaining := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(remaining * 1000) + 1, zmq.POLLOUT):
                continue
            try:
                send_message(self.sock, msg, flags=zmq.NOBLOCK, **encode_options)
                return True
            except zmq.Again:
                time.sleep(0.001)  # the pipe went away after the poll said it could take the message
        return False

    def _close_socket(self) -> None:
        if self.sock is not None:
            self.sock.disable_monitor()
            self.sock.close(linger=0)
            self.sock = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None
        self._poller = None

    def request(self, msg: Message, *, timeout_s: float | None = None, retries: int | None = None,
                **encode_options: Any) -> Message:
        """Send ``msg`` and return the reply; raise ``RemoteError`` for an error reply.

        ``PeerUnavailable`` after every attempt timed out or lost its server (an attempt ends as soon as the
        server closes the connection, not at its timeout). Each attempt uses a fresh sequence number so a
        late reply to an earlier attempt can never be mistaken for the answer to this one.
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        attempts = self.retries if retries is None else max(1, retries)
        for attempt in range(1, attempts + 1):
            self.seq += 1
            msg.seq = self.seq
            assert self.sock is not None
            self.last_failure = ""
            self._drain_events()
            self._events.clear()  # what happened before this attempt says nothing about it
            deadline = time.monotonic() + timeout
            # A REQ send blocks while no connection to the server has completed its handshake (a client
            # without the server's CURVE key never completes one): wait for it within the attempt's
            # time, never forever. The pipe can vanish between the poll and the send, hence NOBLOCK.
            if not self._send_before(deadline, msg, encode_options):
                deadline = 0.0
                self.last_failure = UNSENT_REASON
            while (remaining := deadline - time.monotonic()) > 0:
                if not self._reply_or_gone(remaining):
                    continue
                if self.last_failure:  # the connection is gone: its reply is not coming
                    break
                try:
                    reply = recv_message(self.sock)
                except ProtocolError:
                    # A REQ socket is ready to send again after any reply; rebuild to be safe.
                    self._connect()
                    raise
                if reply.seq != msg.seq:
                    # A fresh socket per attempt cannot get a late reply to an earlier one: the server is
                    # confused. Say so (the caller backs off) instead of retrying at once.
                    self._connect()
                    raise ProtocolError("seq", f"the request's seq {msg.seq}", reply.seq)
                if reply.kind == KIND_ERROR:
                    raise RemoteError(reply)
                return reply
            if not self.last_failure:
                self.last_failure = DROPPED_REPLY_REASON if self._dropped_for_good() else ""
            log.info("no reply from %s (attempt %d/%d)%s; reconnecting", self.endpoint, attempt, attempts,
                     f": {self.last_failure}" if self.last_failure else "")
            self._connect()
        raise PeerUnavailable(self.endpoint, attempts, timeout, self.last_failure)

    def close(self) -> None:
        self._close_socket()


class RouterServer:
    """A bound ROUTER socket serving REQ (or DEALER) clients; each request keeps its return envelope."""

    def __init__(self, factory: SocketFactory, endpoint: str, *, hwm: int = 64) -> None:
        self.endpoint = endpoint
        self.sock = factory.socket(zmq.ROUTER, hwm=hwm, server=True)
        # Unroutable replies (client gone) are dropped silently rather than raising.
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.bind(endpoint)

    def receive(self, timeout_s: float) -> tuple[list[bytes], list[Any]] | None:
        """Wait for one request: returns (envelope, message frames), or None on timeout.

        The envelope is everything up to and including the empty delimiter frame that REQ adds.
        """
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        frames = self.sock.recv_multipart(copy=False)
        for index, frame in enumerate(frames):
            if len(frame) == 0:
                return [bytes(f.buffer) for f in frames[: index + 1]], frames[index + 1 :]
        # A DEALER client without the delimiter: treat the first frame as identity.
        return [bytes(frames[0].buffer)], frames[1:]

    def reply(self, envelope: list[bytes], msg: Message, **encode_options: Any) -> None:
        send_message(self.sock, msg, prefix=envelope, **encode_options)

    def close(self) -> None:
        self.sock.close(linger=0)


def stop_event_on_signals() -> threading.Event:
    """An Event set by SIGTERM or SIGINT, so a node's loop can finish its tick and close cleanly."""
    stop = threading.Event()

    def _handler(signum: int, _frame: Any) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    return stop
