"""The pseudo-terminal the emulator serves: its slave side is linked at ``arms.<arm>.port``, so LeRobot
opens it like a serial port; raw mode, non-blocking master, the host's configured baud rate."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import termios
import tty
from pathlib import Path

from nodes.servo_emulator.sts3215 import BAUD_RATES

# ---------------------------------------------------------------------------------------------------
# The pseudo-terminal
# ---------------------------------------------------------------------------------------------------
_TERMIOS_BAUD = {getattr(termios, f"B{rate}"): rate for rate in BAUD_RATES.values() if hasattr(termios, f"B{rate}")}


class PtyLink:
    """A pseudo-terminal whose slave is linked at ``port``; the emulator reads/writes the master side."""

    def __init__(self, port: Path) -> None:
        self.port = port
        if port.exists() and not port.is_symlink():
            raise FileExistsError(f"{port} exists and is not a symlink (a real serial device?); refusing to replace "
                                  "it. Point arms.<arm>.port at a free path for the emulator.")
        self.master, self.slave = os.openpty()
        # Raw mode: no echo, no line editing, no CR/LF translation - bytes pass through untouched.
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.slave_path = os.ttyname(self.slave)
        port.parent.mkdir(parents=True, exist_ok=True)
        temporary = port.with_name(f".{port.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        temporary.symlink_to(self.slave_path)
        temporary.replace(port)  # atomic: a stale link from a killed emulator is simply replaced

    def line_baud(self) -> int | None:
        """The baud rate the host configured on the slave side (None if it is not a standard rate)."""
        try:
            speed = termios.tcgetattr(self.slave)[5]
        except termios.error:
            return None
        return _TERMIOS_BAUD.get(speed)

    def read(self, timeout_s: float) -> bytes:
        ready, _, _ = select.select([self.master], [], [], timeout_s)
        if not ready:
            return b""
        try:
            return os.read(self.master, 4096)
        except BlockingIOError:
            return b""
        except OSError as exc:  # EIO: no slave open; we keep one open, but be tolerant
            if exc.errno == errno.EIO:
                return b""
            raise

    def write(self, data: bytes) -> int:
        """Write a reply; returns the bytes that did not fit (the host is not reading)."""
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.master, view)
            except BlockingIOError:
                return len(view)
            view = view[written:]
        return 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.port.is_symlink() and os.readlink(self.port) == self.slave_path:
                self.port.unlink()
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)
