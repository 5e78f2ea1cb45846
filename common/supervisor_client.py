"""Status and restart of armpipe's processes through supervisord's XML-RPC interface.

supervisord (``supervisord.conf``) runs every node; its ``[inet_http_server]`` (or ``[unix_http_server]``)
exposes ``supervisor.getAllProcessInfo``, ``stopProcess``, ``startProcess``, ``tailProcessStdoutLog`` and
``getAllConfigInfo``.
This module wraps exactly those calls with a timeout, so a hung or absent supervisord never hangs the
monitor, and merges in the nodes' own files: readiness (``<run_dir>/ready/<program>.json``, see
``common.node.Readiness``) and the reason a node refused to run (``<run_dir>/refused/<program>.json``,
see ``common.refusal``). A program that is down without a recorded refusal (a crash: BACKOFF, FATAL, an
unexpected exit) gets the last error line of its log as its reason.

URLs: ``http://[user:password@]host:port/RPC2`` or ``unix:///path/to/supervisor.sock``.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import socket
import time
import xmlrpc.client
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from common.refusal import REFUSED_DIR, read_refusals

# supervisor.xmlrpc.Faults values (not imported so this module needs only the standard library).
FAULT_BAD_NAME = 10
FAULT_ALREADY_STARTED = 60
FAULT_NOT_RUNNING = 70


class SupervisorUnavailable(ConnectionError):
    """supervisord did not answer at the configured URL."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        super().__init__(f"supervisord at {url} is not reachable: {reason}")


class UnknownProcess(KeyError):
    """A program name supervisord does not know."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(name)

    def __str__(self) -> str:
        return f"unknown node {self.name!r}; supervisord runs {self.known}"


class SupervisorError(RuntimeError):
    """supervisord refused a call (spawn error, abnormal termination, ...)."""


@dataclass
class ProcessStatus:
    name: str  # the program name, e.g. "camera-front" (also the readiness file's name)
    group: str
    state: str  # supervisord's statename: RUNNING, STARTING, STOPPED, BACKOFF, FATAL, EXITED, ...
    pid: int  # 0 when not running
    uptime_s: float
    description: str  # supervisord's one-line description ("pid 123, uptime 0:00:05" or the error)
    ready: bool | None = None  # readiness file present with a live pid; None: no readiness information
    exit_status: int = 0  # the last exit code supervisord saw (0 while it never exited)
    reason: str = ""  # why it is not running: its refusal, or the last error line of its log after a crash
    refused: bool = False  # it stopped on purpose (exit 2: config, checkpoint or dataset); no restart will help
    role: str = ""  # policy.standby: "serving" or "standby", from the readiness file; "" for other nodes
    # A node that runs and is ready but refuses its work (the actuator on a contract mismatch): why, from its
    # readiness file's "refusing"; "" otherwise
    refusing: str = ""
    # The policy node's capacity over its last 10 s (chunks/s, batch sizes, queue wait), from its readiness file's
    # "capacity"; "" for other nodes
    capacity: str = ""

    @property
    def full_name(self) -> str:
        """The name the XML-RPC calls take: ``group:name``."""
        return f"{self.group}:{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _TimeoutTransport(xmlrpc.client.Transport):
    """HTTP or UNIX-socket transport with a timeout and optional basic auth; one connection per call."""

    def __init__(self, url: str, timeout_s: float) -> None:
        super().__init__()
        self.url = url
        self.timeout_s = timeout_s
        parsed = urlparse(url)
        self.scheme = parsed.scheme
        self.socket_path = parsed.path if parsed.scheme == "unix" else ""
        self.auth_header = ""
        if parsed.username is not None:
            token = f"{unquote(parsed.username)}:{unquote(parsed.password or '')}".encode()
            self.auth_header = "Basic " + base64.b64encode(token).decode("ascii")

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        if self.scheme == "unix":
            return _UnixHTTPConnection(self.socket_path, self.timeout_s)
        parsed = urlparse(self.url)
        return http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port or 80, timeout=self.timeout_s)

    def send_headers(self, connection: http.client.HTTPConnection, headers: list[tuple[str, str]]) -> None:
        if self.auth_header:
            headers = [*headers, ("Authorization", self.auth_header)]
        super().send_headers(connection, headers)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


class SupervisorClient:
    """Thread-safe (a fresh connection per call) client for the calls the monitor needs."""

    def __init__(self, url: str, *, timeout_s: float = 3.0, ready_dir: Path | None = None,
                 refused_dir: Path | None = None) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "unix"):
            raise ValueError(f"supervisor url {url!r}: expected http://host:port/RPC2 or unix:///path.sock")
        self.url = url
        self.timeout_s = timeout_s
        self.ready_dir = ready_dir
        # Both live in the run directory: <run_dir>/ready and <run_dir>/refused.
        self.refused_dir = refused_dir or (ready_dir.parent / REFUSED_DIR if ready_dir is not None else None)

    def _proxy(self, timeout_s: float | None = None) -> xmlrpc.client.ServerProxy:
        # ServerProxy needs an http URL even for the UNIX transport; the host part is ignored there.
        parsed = urlparse(self.url)
        proxy_url = self.url if parsed.scheme == "http" else "http://localhost/RPC2"
        if parsed.username is not None:  # the transport sends auth itself; keep it out of the URL
            proxy_url = f"http://{parsed.hostname}:{parsed.port or 80}{parsed.path or '/RPC2'}"
        transport = _TimeoutTransport(self.url, self.timeout_s if timeout_s is None else timeout_s)
        return xmlrpc.client.ServerProxy(proxy_url, transport=transport, allow_none=True)

    def _call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        try:
            return getattr(self._proxy(timeout_s).supervisor, method)(*args)
        except xmlrpc.client.Fault:
            raise
        except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError) as exc:
            raise SupervisorUnavailable(self.url, f"{type(exc).__name__}: {exc}") from exc

    def state(self) -> str:
        """supervisord's own state (``supervisor.getState``): ``RUNNING``, or ``SHUTDOWN`` while it stops every
        program (``supervisorctl shutdown``, ``make stop``), ``RESTARTING`` while it reloads."""
        return str(self._call("getState")["statename"])

    def processes(self) -> list[ProcessStatus]:
        """Every program supervisord runs, with readiness merged in where ``ready_dir`` is set."""
        infos = self._call("getAllProcessInfo")
        statuses = [
            ProcessStatus(
                name=info["name"],
                group=info["group"],
                state=info["statename"],
                pid=int(info.get("pid") or 0),
                uptime_s=float(info["now"] - info["start"]) if info.get("pid") else 0.0,
                description=str(info.get("description", "")),
                exit_status=int(info.get("exitstatus") or 0),
            )
            for info in infos
        ]
        refusals = read_refusals(self.refused_dir) if self.refused_dir is not None else {}
        for status, info in zip(statuses, infos, strict=True):
            entry = refusals.get(status.name)
            # Only a refusal of the latest spawn counts (supervisord's start time; 1 s of slack for rounding).
            if entry and float(entry.get("since", 0)) >= float(info.get("start") or 0) - 1.0:
                status.reason, status.refused = entry["reason"], True
            elif status.state in ("BACKOFF", "FATAL") or (status.state == "EXITED" and status.exit_status):
                status.reason, status.refused = self._reason_from_log(status.full_name)
        if self.ready_dir is not None:
            ready = read_readiness(self.ready_dir)
            for status in statuses:
                entry = ready.get(status.name)
                # A readiness file counts only for the process supervisord is running now (or a child of it,
                # when the program's command is a wrapper): a node killed with SIGKILL cannot remove its
                # file, and a restarted one has a new pid.
                status.ready = bool(entry and entry.get("alive") and status.pid
                                    and _descends_from(int(entry["pid"]), status.pid))
                if status.ready and entry and "serving" in entry:
                    status.role = "serving" if entry["serving"] else "standby"
                if status.ready and entry and entry.get("refusing"):
                    status.refusing = str(entry["refusing"])
                if status.ready and entry and isinstance(entry.get("capacity"), dict):
                    status.capacity = describe_capacity(entry["capacity"])
        return statuses

    def config_info(self) -> list[dict[str, Any]]:
        """supervisord's settings of every program (``getAllConfigInfo``: name, group, startsecs, exitcodes, ...)."""
        return list(self._call("getAllConfigInfo"))

    def _reason_from_log(self, full_name: str) -> tuple[str, bool]:
        """(the last error line of the program's log, whether it is a refusal); ("", False) if none."""
        try:
            text = self._call("tailProcessStdoutLog", full_name, 0, LOG_TAIL_BYTES)[0]
        except (xmlrpc.client.Fault, SupervisorUnavailable):
            return "", False
        return last_error_line(str(text))

    def _resolve(self, name: str) -> ProcessStatus:
        statuses = self.processes()
        for status in statuses:
            if name in (status.name, status.full_name):
                return status
        raise UnknownProcess(name, sorted(status.name for status in statuses))

    def restart(self, name: str, *, wait_s: float = 30.0) -> ProcessStatus:
        """Stop (if running) and start one program; returns its status afterwards.

        ``name`` is the program name (``camera-front``) or ``group:name``. Raises ``UnknownProcess`` for a
        name supervisord does not run and ``SupervisorError`` when it cannot start it again.
        """
        status = self._resolve(name)
        try:
            self._call("stopProcess", status.full_name, True, timeout_s=wait_s)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode != FAULT_NOT_RUNNING:
                raise SupervisorError(f"stopping {status.name}: {fault.faultString}") from fault
        try:
            self._call("startProcess", status.full_name, True, timeout_s=wait_s)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode == FAULT_BAD_NAME:
                raise UnknownProcess(name, []) from fault
            if fault.faultCode != FAULT_ALREADY_STARTED:
                raise SupervisorError(f"starting {status.name}: {fault.faultString}") from fault
        return self._resolve(status.full_name)


LOG_TAIL_BYTES = 4096  # enough for a traceback's last lines
MAX_REASON_CHARS = 300
# "2026-12-02 00:10:07,233 ERROR policy armpipe.refusal: " (common.node.setup_logging's format)
LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ \S+ \S+: ")
ERROR_LINE = re.compile(r"^\d{4}-\d\d-\d\d \S+ (ERROR|CRITICAL) |^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")


def last_error_line(log_text: str) -> tuple[str, bool]:
    """The newest refusal (``REFUSED: ...``) or error line (a logged ERROR/CRITICAL, a traceback's final
    ``SomeError: ...`` line) of a log tail, without its time stamp; and whether it is a refusal."""
    for line in reversed(log_text.splitlines()):
        line = line.strip()
        if "REFUSED: " in line:
            return line.split("REFUSED: ", 1)[1][:MAX_REASON_CHARS], True
        if ERROR_LINE.search(line):
            return LOG_PREFIX.sub("", line)[:MAX_REASON_CHARS], False
    return "", False


def describe_capacity(figures: dict[str, Any]) -> str:
    """The policy node's readiness ``capacity`` in one line (docs/nodes/policy.md, "Many robots")."""
    sessions = f" from {figures['sessions']} sessions" if "sessions" in figures else ""
    model = f", model thread busy {100 * figures['model_busy']:.0f} %" if "model_busy" in figures else ""
    return (f"{figures.get('chunks_per_s', 0)} chunks/s{sessions}, batch mean {figures.get('batch_mean', 0)} max "
            f"{figures.get('batch_max', 0)}/{figures.get('max_batch', '?')}, queue wait p99 "
            f"{figures.get('queue_ms_p99', 0)} ms{model}, superseded {figures.get('superseded', 0)}, busy "
            f"{figures.get('refused_busy', 0)}")


def read_readiness(ready_dir: Path) -> dict[str, dict[str, Any]]:
    """``{program: {pid, since, ..., alive}}`` from ``<run_dir>/ready/*.json``; unreadable files are skipped."""
    entries: dict[str, dict[str, Any]] = {}
    if not ready_dir.is_dir():
        return entries
    for path in sorted(ready_dir.glob("*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now (Readiness writes a .tmp and renames) or corrupt
        if not isinstance(entry, dict):
            continue
        pid = entry.get("pid")
        entry["alive"] = isinstance(pid, int) and _pid_alive(pid)
        entry["age_s"] = max(0.0, time.time() - float(entry.get("since", time.time())))
        entries[path.stem] = entry
    return entries


def _descends_from(pid: int, ancestor: int, max_depth: int = 4) -> bool:
    """``pid`` is ``ancestor`` or one of its descendants (Linux /proc; elsewhere only equality counts)."""
    for _ in range(max_depth + 1):
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        # The command name (field 2) may contain spaces and parentheses: the parent pid follows the last ')'.
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        if pid <= 1:
            return False
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
