"""One policy process serves a bind endpoint; a loaded standby waits to take it over.

With ``policy.standby: true`` supervisord runs the policy node twice (programs ``policy`` and
``policy-standby``). Both load the checkpoint and warm up; then each asks for the serving lock of the bind
endpoint, an exclusive ``flock`` on ``<run_dir>/locks/policy-<endpoint digest>.lock``. The one that gets
it binds and serves; the other waits, polling, already loaded. The kernel releases the lock the moment
its holder ends, however it ends (``supervisorctl restart``, a crash, ``kill -9``), so the standby binds
within a poll period and the client loses only the request that was in flight; supervisord restarts the
ended process, which becomes the next standby.

Why a lock and not just the bind: a tcp bind of a port in use fails, but an ``ipc://`` bind takes the
path over from a live server (libzmq unlinks it), and a failed bind says nothing about a server that is
still starting. Without ``policy.standby`` the lock is taken at once; a second node started by mistake
on the same endpoint waits and says so, instead of stealing the socket.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import zmq

from common.wire.transport import RouterServer, SocketFactory

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often a standby tries the lock: the take-over delay, at most
BIND_WAIT_S = 5.0  # how long a new holder waits for the old one's listening socket to close


class ServingLock:
    """The exclusive right to bind ``endpoint`` on this machine, held until ``release`` or the process ends."""

    def __init__(self, run_dir: Path, endpoint: str) -> None:
        digest = hashlib.sha256(endpoint.encode()).hexdigest()[:12]
        self.path = run_dir / "locks" / f"policy-{digest}.lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.endpoint = endpoint
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who serves, for a person reading the file
        self._fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def wait(self, stop: threading.Event) -> bool:
        """Block until the lock is ours (True) or ``stop`` is set (False)."""
        if self.try_acquire():
            return True
        log.info("standby: %s is served by pid %s (lock %s); loaded and waiting to take over", self.endpoint,
                 self.holder(), self.path)
        while not stop.wait(POLL_S):
            if self.try_acquire():
                return True
        return False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def bind_when_free(factory: SocketFactory, endpoint: str, stop: threading.Event,
                   wait_s: float = BIND_WAIT_S) -> RouterServer | None:
    """The server bound to ``endpoint`` once it is free; None if ``stop`` is set first. The lock can come free a moment
    before the old holder's port does: its ZeroMQ I/O thread closes the listening socket after the
    process let go of the lock (a SIGTERM), or the kernel closes the two in either order (kill -9)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return RouterServer(factory, endpoint)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                raise
        if stop.wait(0.02):
            return None
        log.debug("%s still in use by the process before; binding again", endpoint)
