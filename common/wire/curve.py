"""CURVE on the policy link: certificate files, the server's authenticator, and the refusal log.

Everything cryptographic is libzmq's CURVE (ZMTP 3 with CurveZMQ) set up through pyzmq's ``zmq.auth``:
certificates written by ``zmq.auth.create_certificates`` and read by ``zmq.auth.load_certificate``;
the server's allowed clients checked by a ``zmq.auth.thread.ThreadAuthenticator`` configured with
``configure_curve`` on a directory of client public certificates (``*.key``).

When CURVE is on (``DeploymentConfig.policy_curve``): the policy binds anything but loopback, or
clients connect to anything but loopback, or any key file is configured; and the config does not say
``insecure: true``. Both machines read the same deployment file, so they agree. Which keys a side uses
comes from the config (``common.config.curve_keys_for``); this module reads the files.

A client that is refused gets nothing back: libzmq drops the connection during the handshake, before
any message reaches the policy's loop, so no reply and no session. The server logs each refused peer
once, with its address: for a client whose CURVE key is not allowed, the ZAP request carries the
address; for a client without CURVE (or with a wrong server key) the handshake fails before ZAP, and
libzmq 4.3's monitor events name only the server's own endpoint, so the peer is read from the accepted
socket when it is still open (on a fast link it usually is not: the log then says so).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("armpipe.curve")

ZAP_DOMAIN = "armpipe"  # the ZAP domain of armpipe's CURVE servers (libzmq refuses every peer if no handler serves it)
KEYS_COMMAND = "python -m common.tools.keys --out DIR --name NAME"
RELOAD_ALLOWED_S = 5.0  # the allowed-clients directory is re-read at most this often, on a handshake
MAX_LOGGED_PEERS = 4096  # bound the once-per-peer memory; past it refusals are only counted


def is_loopback(endpoint: str) -> bool:
    """True for endpoints that cannot leave this machine: ``tcp://`` to a loopback address or
    ``localhost``, and ``ipc://`` / ``inproc://``. ``tcp://*``, ``0.0.0.0``, interface names and host
    names all count as crossing hosts."""
    scheme, sep, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp" or not sep:
        return False
    address = rest.split(";")[-1]  # libzmq's "tcp://source;destination" form: the destination
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class CurveKeys:
    """The keys one side of a CURVE link uses, as Z85 text (40 characters each).

    A server sets ``server_public``, ``server_secret`` and ``allowed_clients_dir``; a client sets
    ``server_public`` (whom it expects to talk to) and its own ``client_public`` / ``client_secret``.
    """

    server_public: bytes = b""
    server_secret: bytes = b""
    client_public: bytes = b""
    client_secret: bytes = b""
    allowed_clients_dir: str = ""


# ------------------------------------------------------------------------------------------ key files
class KeyFileError(ValueError):
    """A certificate file or directory that cannot be used; the message names the file."""


def _check_key(text: bytes | None, path: Path, which: str) -> bytes:
    if not text:
        raise KeyFileError(f"no {which} key in {path}; expected a certificate written by {KEYS_COMMAND}")
    try:
        ok = len(text) == 40 and len(z85.decode(text)) == 32
    except (ValueError, KeyError, IndexError):
        ok = False
    if not ok:
        raise KeyFileError(f"the {which} key in {path} is not a 40-character Z85 CURVE key")
    return text


def load_certificate_file(path: Path, *, secret: bool) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of a pyzmq certificate file; ``KeyFileError`` naming the file otherwise.

    ``secret=True`` requires a secret certificate (``<name>.key_secret``); the secret comes back empty
    otherwise. A secret file others can read is used, with a warning (as ssh does for identity files).
    """
    if not path.is_file():
        raise KeyFileError(f"no such file: {path}")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the CURVE certificate {path}: {exc}") from exc
    public = _check_key(public, path, "public")
    if not secret:
        return public, b""
    secret_key = _check_key(secret_key, path, "secret")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("the secret CURVE certificate %s can be read by other users: chmod 600 it", path)
    return public, secret_key


def check_allowed_clients(directory: Path) -> int:
    """The number of client public certificates (``*.key``) in ``directory``, each checked readable (one
    bad file is an error naming it, not a silently ignored client); ``KeyFileError`` if there are none."""
    if not directory.is_dir():
        raise KeyFileError(f"no such directory: {directory}")
    certificates = sorted(directory.glob("*.key"))
    if not certificates:
        raise KeyFileError(f"no client public certificates (*.key) in {directory}: no client could connect; "
                           f"copy each robot's <name>.key there")
    for certificate in certificates:
        load_certificate_file(certificate, secret=False)
    return len(certificates)


# ------------------------------------------------------------------------------------------ server side
class RefusalLog:
    """Counts refused handshakes and logs each (peer, reason) once, so a client retrying every 100 ms
    cannot flood the log. Thread-safe: the ZAP thread and the handshake monitor both report here.
    (A peer whose address could not be read is one more "peer": logged once as such.)"""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: set[tuple[str, str]] = set()
        self.refused = 0
        self.accepted: set[tuple[str, str]] = set()

    def refuse(self, peer: str, reason: str) -> None:
        with self.lock:
            self.refused += 1
            key = (peer, reason)
            if key in self.seen or len(self.seen) >= MAX_LOGGED_PEERS:
                return
            self.seen.add(key)
        log.warning("refused client %s: %s (it gets no reply; logged once per peer)", peer, reason)

    def accept(self, peer: str, key: str) -> None:
        with self.lock:
            if (peer, key) in self.accepted or len(self.accepted) >= MAX_LOGGED_PEERS:
                return
            self.accepted.add((peer, key))
        log.info("client %s authenticated with CURVE key %s", peer, key)


class CurveAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler thread, allowing the client keys in one directory, and reporting each
    decision with the peer's address (pyzmq itself logs denials at debug level without it)."""

    def __init__(self, context: zmq.Context, allowed_clients_dir: str, refusals: RefusalLog) -> None:
        super().__init__(context, log=logging.getLogger("armpipe.curve.zap"))
        self.allowed_clients_dir = allowed_clients_dir
        self.refusals = refusals
        self.loaded_at = 0.0

    def reload(self) -> None:
        """Read the allowed-clients directory again: a key copied there is let in without a restart."""
        self.configure_curve(domain=ZAP_DOMAIN, location=self.allowed_clients_dir)
        self.loaded_at = time.monotonic()

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # Runs in the authenticator's thread, one request at a time, so reloading here is safe.
        if time.monotonic() - self.loaded_at > RELOAD_ALLOWED_S:
            self.reload()
        await super().handle_zap_message(msg)
        if len(msg) < 7 or msg[5] != b"CURVE":
            return
        domain = msg[2].decode("utf-8", "replace") or "*"
        address = msg[3].decode("utf-8", "replace") or "(no address)"
        key = z85.encode(msg[6])
        if self.certs.get(domain, {}).get(key):
            self.refusals.accept(address, key.decode())
        else:
            self.refusals.refuse(address, f"CURVE key {key.decode()} is not among the allowed clients in "
                                          f"{self.allowed_clients_dir}")


_HANDSHAKE_FAILURES = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "it does not use CURVE (handshake mechanism mismatch)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "its CURVE handshake does not decrypt (it uses a wrong server public key)",
    zmq.PROTOCOL_ERROR_ZMTP_KEY_EXCHANGE: "CURVE key exchange failed",
}


class HandshakeWatch(threading.Thread):
    """Reads a server socket's monitor events and reports handshakes that fail before ZAP (clients
    without CURVE, wrong server key). libzmq 4.3's events name the server's endpoint, not the peer, so
    the peer is read from the accepted socket's file descriptor while it is still open."""

    # HANDSHAKE_FAILED_AUTH (a key ZAP refused) is reported by the authenticator, which knows the address.
    # HANDSHAKE_FAILED_NO_DETAIL is the peer hanging up mid-handshake (EPIPE, ECONNRESET): what the server
    # sees when a client without CURVE notices the mismatch first and leaves (a race with the server).
    EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_MONITOR_STOPPED)

    def __init__(self, sock: zmq.Socket, refusals: RefusalLog) -> None:
        super().__init__(name="curve-handshake-watch", daemon=True)
        self.monitor = sock.get_monitor_socket(self.EVENTS)
        self.refusals = refusals

    def run(self) -> None:
        peers: dict[int, str] = {}
        failure = ""
        try:
            while True:
                try:
                    event = recv_monitor_message(self.monitor)
                except zmq.ZMQError:  # context terminated
                    return
                kind, value = event["event"], event["value"]
                if kind == zmq.EVENT_MONITOR_STOPPED:
                    return
                if kind == zmq.EVENT_ACCEPTED:
                    peers[value] = _peer_of(value)
                elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                    failure = _HANDSHAKE_FAILURES.get(value, f"ZMTP protocol error {value:#x} in the handshake")
                elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                    failure = (f"it hung up during the CURVE handshake ({errno.errorcode.get(value, value)}): "
                               "a client without CURVE, or one that gave up")
                elif kind == zmq.EVENT_DISCONNECTED:
                    # libzmq reports a failed handshake, then the disconnect of that same connection.
                    peer = peers.pop(value, "")
                    if failure:
                        self.refusals.refuse(peer or "(address not reported: the connection closed before it "
                                             "could be read)", failure)
                        failure = ""
        finally:
            self.monitor.close(linger=0)


def _peer_of(fd: int) -> str:
    """The peer address of an accepted TCP connection's descriptor, or "" once libzmq has closed it."""
    try:
        # fromfd duplicates the descriptor, so closing ours never touches libzmq's.
        with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as duplicate:
            peer = duplicate.getpeername()
    except OSError:
        return ""
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def apply_server_curve(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make ``sock`` a CURVE server that only lets in the keys the ZAP handler allows."""
    sock.curve_server = True
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    sock.zap_domain = ZAP_DOMAIN.encode()
    # Without this libzmq lets every CURVE client in when no ZAP handler answers (the "Stonehouse"
    # legacy behaviour); with it, a missing handler refuses them all.
    sock.zap_enforce_domain = True


def apply_client_curve(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make ``sock`` a CURVE client that talks only to the server holding ``keys.server_public``'s secret."""
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.client_public
    sock.curve_secretkey = keys.client_secret
