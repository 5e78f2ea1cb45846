"""Run armpipe under the real ``supervisord.conf`` from a test or a benchmark, and watch what it does.

``Supervised`` starts ``supervisord -c supervisord.conf`` with the ARMPIPE_* variables for one role,
task and deployment config (its own run directory and XML-RPC port, so it never collides with a demo
running on the same machine), and offers the operator's verbs: status, restart, kill -9, stop, start.
``StreamTap`` reads a stream in a thread and hands each message to its subclass: ``ActuatorWatch`` keeps every
executed tick and event of the actuator.
``StandInServer`` answers requests on a ROUTER socket in a thread, where a test or benchmark stands in for
a server (the policy node, usually).
"""

from __future__ import annotations

import logging
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
import zmq

from common.config import REPO_ROOT, DeploymentConfig, load_config
from common.supervisor_client import ProcessStatus, SupervisorClient, SupervisorUnavailable
from common.tools.supervisor_programs import PROGRAMS_FILE, write_programs
from common.wire.protocol import KIND_ACTION, KIND_EVENT, Message, decode
from common.wire.transport import LatestSubscriber, RouterServer, SocketFactory

log = logging.getLogger(__name__)
BIN = Path(sys.executable).parent


_PORTS_GIVEN: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range: a port the kernel hands out itself (bind to
    0) can be taken as the source port of some outgoing connection (every ZeroMQ connect makes one) between this
    pick and the node's bind, which a suite run once saw as EADDRINUSE. Never the same port twice per process."""
    low = _ephemeral_low()
    if low > 12000:
        for _ in range(500):
            port = random.randrange(10000, low)
            if port in _PORTS_GIVEN:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _PORTS_GIVEN.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for naming the machine a benchmark ran on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def write_config(tmp_path: Path, task: str = "lift", overrides: dict[str, Any] | None = None) -> Path:
    """Copy ``configs/<task>.yaml`` with every endpoint on a free port and run files under tmp_path.

    ``overrides`` is deep-merged afterwards (e.g. ``{"policy": {"checkpoint": str(path)}}``).
    """
    raw = yaml.safe_load((REPO_ROOT / "configs" / f"{task}.yaml").read_text())
    for cam in raw.get("cameras", {}).values():
        cam["endpoint"] = free_endpoint()
    for name, arm in raw.get("arms", {}).items():
        arm["state_endpoint"] = free_endpoint()
        arm["port"] = str(tmp_path / f"so101_{name}.tty")
        arm["lock_file"] = str(tmp_path / f"bus_{name}.lock")
    policy_port = free_port()
    raw["policy"]["bind"] = f"tcp://127.0.0.1:{policy_port}"
    raw["policy"]["endpoint"] = f"tcp://127.0.0.1:{policy_port}"
    raw["actuator"]["control_endpoint"] = free_endpoint()
    raw["actuator"]["events_endpoint"] = free_endpoint()
    raw["player"]["gt_endpoint"] = free_endpoint()
    raw["monitor"]["port"] = free_port()
    raw["run_dir"] = str(tmp_path / "run")
    raw["recorder"]["output_dir"] = str(tmp_path / "recordings")
    deep_merge(raw, overrides or {})
    path = tmp_path / f"{task}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class Supervised:
    """One supervisord instance running a role's programs for one deployment config."""

    def __init__(self, role: str, task: str, config_path: Path, run_dir: Path, supervisor_port: int,
                 *, netns: str = "") -> None:
        self.role = role
        self.task = task
        self.config_path = Path(config_path)
        self.run_dir = Path(run_dir)
        self.port = supervisor_port
        self.netns = netns  # run supervisord (and so every program) inside this network namespace
        self.env = {
            **os.environ,
            "ARMPIPE_ROLE": role,
            "ARMPIPE_TASK": task,
            "ARMPIPE_CONFIG": str(self.config_path.resolve()),
            "ARMPIPE_RUN": str(self.run_dir.resolve()),
            "ARMPIPE_SUPERVISOR_PORT": str(supervisor_port),
            "ARMPIPE_PYTHON": sys.executable,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
        }
        self.config: DeploymentConfig = load_config(self.config_path)
        # The UNIX socket, not the TCP port: it also reaches a supervisord inside another network namespace.
        self.client = SupervisorClient(f"unix://{self.run_dir.resolve()}/supervisor.sock", timeout_s=5.0,
                                       ready_dir=self.config.resolve(self.config.run_dir) / "ready")
        self.started_at = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Supervised:
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        write_programs(self.role, self.config_path, self.run_dir / PROGRAMS_FILE)  # what .ci/supervise does
        self.started_at = time.monotonic()
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        subprocess.run([*prefix, str(BIN / "supervisord"), "-c", str(REPO_ROOT / "supervisord.conf")],
                       env=self.env, cwd=REPO_ROOT, check=True, timeout=30)
        return self

    def ctl(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``supervisorctl -c supervisord.conf <args>`` as an operator would."""
        return subprocess.run([str(BIN / "supervisorctl"), "-c", str(REPO_ROOT / "supervisord.conf"), *args],
                              env=self.env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                              check=check)

    def shutdown(self, timeout_s: float = 60.0) -> None:
        pid_file = self.run_dir / "supervisord.pid"
        pid = int(pid_file.read_text()) if pid_file.exists() else 0
        self.ctl("shutdown")
        deadline = time.monotonic() + timeout_s
        while pid and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        if pid:
            log.warning("supervisord %d did not shut down in %.0fs; killing it", pid, timeout_s)
            os.kill(pid, signal.SIGKILL)

    # ------------------------------------------------------------------ observation
    def processes(self) -> list[ProcessStatus]:
        try:
            return self.client.processes()
        except SupervisorUnavailable:
            return []

    def process(self, name: str) -> ProcessStatus:
        for proc in self.processes():
            if proc.name == name:
                return proc
        raise KeyError(name)

    def running_pid(self, name: str) -> int:
        """The pid of program ``name`` while supervisord says it is RUNNING, else 0."""
        for status in self.processes():
            if status.name == name and status.state == "RUNNING":
                return int(status.pid)
        return 0

    def all_ready(self) -> bool:
        procs = self.processes()
        return bool(procs) and all(p.state == "RUNNING" and p.ready for p in procs)

    def wait_all_ready(self, timeout_s: float = 180.0) -> float:
        """Seconds until every program is RUNNING and ready; raises with the logs' tails otherwise."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.all_ready():
                return time.monotonic() - start
            time.sleep(0.25)
        states = [(p.name, p.state, p.ready) for p in self.processes()]
        raise AssertionError(f"not all ready after {timeout_s}s: {states}\n{self.log_tails()}")

    def wait_ready(self, name: str, *, other_pid: int = 0, timeout_s: float = 120.0) -> ProcessStatus:
        """Wait until ``name`` is RUNNING and ready (and, with ``other_pid``, running as a new process)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                proc = self.process(name)
            except KeyError:
                proc = None
            if proc and proc.state == "RUNNING" and proc.ready and proc.pid and proc.pid != other_pid:
                return proc
            time.sleep(0.1)
        raise AssertionError(f"{name} not back and ready after {timeout_s}s\n{self.log_tails([name])}")

    def log_tails(self, names: list[str] | None = None, lines: int = 25) -> str:
        out = []
        for path in sorted((self.run_dir / "logs").glob("*.log")):
            if names and path.stem not in names:
                continue
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"== {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def kill9(self, name: str) -> int:
        pid = self.process(name).pid
        os.kill(pid, signal.SIGKILL)
        return pid

    def full_name(self, name: str) -> str:
        return self.process(name).full_name


@dataclass
class Tick:
    received: float  # monotonic, when the watcher got it
    t: float  # the actuator's tick time
    hold: bool
    hold_reason: str
    obs_t: float
    episode_index: int


class StreamTap:
    """A SUB socket on one endpoint, read in a background thread from construction until ``close``: each message
    goes to ``take``, called with ``lock`` held (the subclass's accessors take it too). A subclass sets up what it
    keeps before calling ``StreamTap.__init__``, which starts the thread."""

    def __init__(self, endpoint: str, *, hwm: int = 100_000) -> None:
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(endpoint, hwm), daemon=True)
        self._thread.start()

    def take(self, msg: Message) -> None:
        raise NotImplementedError

    def _run(self, endpoint: str, hwm: int) -> None:
        factory = SocketFactory(zmq.Context())
        subscriber = LatestSubscriber(factory, [endpoint], hwm=hwm)
        try:
            while not self._stop.is_set():
                for msg in subscriber.poll(0.1):
                    with self.lock:
                        self.take(msg)
        finally:
            subscriber.close()
            factory.context.term()

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout_s)


class ActuatorWatch(StreamTap):
    """Collects the actuator's executed ticks and events in a background thread."""

    def __init__(self, events_endpoint: str) -> None:
        self.ticks: list[Tick] = []
        self.events: list[Message] = []
        super().__init__(events_endpoint, hwm=1000)

    def take(self, msg: Message) -> None:
        if msg.kind == KIND_ACTION and msg.meta.get("role") == "executed":
            self.ticks.append(Tick(time.monotonic(), msg.t, bool(msg.meta.get("hold")),
                                   str(msg.meta.get("hold_reason", "")), float(msg.meta.get("obs_t") or 0.0),
                                   int(msg.meta.get("episode_index", -1))))
        elif msg.kind == KIND_EVENT:
            self.events.append(msg)

    def acting_since(self, since: float) -> list[Tick]:
        with self.lock:
            return [tick for tick in self.ticks if tick.received >= since and not tick.hold]

    def ticks_since(self, since: float) -> list[Tick]:
        with self.lock:
            return [tick for tick in self.ticks if tick.received >= since]

    def wait_acting(self, since: float, count: int = 5, timeout_s: float = 120.0) -> float:
        """Monotonic time of the ``count``-th executed (non-hold) action after ``since``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            acting = self.acting_since(since)
            if len(acting) >= count:
                return acting[count - 1].received
            time.sleep(0.05)
        reasons = sorted({tick.hold_reason for tick in self.ticks_since(since)})
        raise AssertionError(f"no executed actions within {timeout_s}s (hold reasons seen: {reasons})")


class StandInServer(threading.Thread):
    """A server in a thread that stands in for one (the policy node, usually): its loop is the policy
    node's, one request at a time, each answered with ``answer(request)``, which a subclass gives.

    ``start()`` serves, ``stop.set()`` (or ``close()``, which also waits) ends the loop, and the socket is
    closed by the serving thread when it ends.
    """

    def __init__(self, factory: SocketFactory, endpoint: str, *, poll_s: float = 0.05, name: str = "stand-in") -> None:
        super().__init__(name=name, daemon=True)
        self.server = RouterServer(factory, endpoint)
        self.poll_s = poll_s
        self.stop = threading.Event()

    def answer(self, request: Message) -> Message:
        raise NotImplementedError

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                received = self.server.receive(self.poll_s)
                if received is None:
                    continue
                envelope, frames = received
                self.server.reply(envelope, self.answer(decode(frames)))
        finally:
            self.server.close()

    def close(self, timeout_s: float = 5.0) -> None:
        self.stop.set()
        self.join(timeout_s)


class OpenpiStandIn(threading.Thread):
    """A server in a thread that serves as openpi's ``serve_policy`` does: its ``WebsocketPolicyServer``'s
    handler line by line (openpi/src/openpi/serving/websocket_policy_server.py): the metadata as the first
    message, then per observation ``policy(obs)`` with ``server_timing`` (``infer_ms``, ``prev_total_ms``) added,
    a traceback as text and close code 1011 on an exception, ``/healthz``. openpi's own msgpack-numpy decodes
    (this plays openpi's server, which trusts its peer), ``compression=None``, ``max_size=None``.

    ``policy(obs) -> {"actions": ...}`` is given by the caller; ``observations`` keeps (arrival time, obs).
    """

    def __init__(self, policy: Any, *, metadata: dict[str, Any] | None = None, host: str = "127.0.0.1",
                 port: int = 0, api_key: str = "") -> None:
        super().__init__(name="openpi-stand-in", daemon=True)
        self.policy = policy
        self.metadata = metadata or {}
        self.host = host
        self.port = port or free_port()
        self.api_key = api_key  # openpi's server takes none; set, it answers 401 without it (a gateway's shape)
        self.observations: list[tuple[float, dict[str, Any]]] = []
        self.connections = 0
        self._ready = threading.Event()
        self._loop: Any = None
        self._stopping: Any = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def run(self) -> None:
        import asyncio

        asyncio.run(self._main())

    async def _main(self) -> None:
        import asyncio
        import http
        import traceback

        import websockets
        import websockets.asyncio.server as server
        import websockets.frames
        from openpi_client import msgpack_numpy

        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()

        def health_check(connection: Any, request: Any) -> Any:
            if request.path == "/healthz":
                return connection.respond(http.HTTPStatus.OK, "OK\n")
            if self.api_key and request.headers.get("Authorization") != f"Api-Key {self.api_key}":
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "bad API key\n")
            return None

        async def handler(websocket: Any) -> None:
            self.connections += 1
            packer = msgpack_numpy.Packer()
            await websocket.send(packer.pack(self.metadata))
            prev_total_time = None
            while True:
                try:
                    start_time = time.monotonic()
                    obs = msgpack_numpy.unpackb(await websocket.recv())
                    self.observations.append((start_time, obs))
                    infer_time = time.monotonic()
                    action = self.policy(obs)
                    infer_time = time.monotonic() - infer_time
                    action["server_timing"] = {"infer_ms": infer_time * 1000}
                    if prev_total_time is not None:
                        action["server_timing"]["prev_total_ms"] = prev_total_time * 1000
                    await websocket.send(packer.pack(action))
                    prev_total_time = time.monotonic() - start_time
                except websockets.ConnectionClosed:
                    break
                except Exception:
                    await websocket.send(traceback.format_exc())
                    await websocket.close(code=websockets.frames.CloseCode.INTERNAL_ERROR,
                                          reason="Internal server error. Traceback included in previous frame.")
                    break  # openpi re-raises here, which ends this connection's handler the same way

        async with server.serve(handler, self.host, self.port, compression=None, max_size=None,
                                process_request=health_check):
            self._ready.set()
            await self._stopping.wait()

    def start(self) -> OpenpiStandIn:
        super().start()
        if not self._ready.wait(30):
            raise RuntimeError(f"the openpi stand-in did not listen on {self.url}")
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self.join(timeout_s)
