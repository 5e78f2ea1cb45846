"""Shared test utilities: free ports, per-test deployment configs, and real node processes.

Tests that need a node start the real process (``python -m nodes.<node>``) with ``NodeProcess`` and
wait for its readiness file; nothing here fakes a node.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.harness import Supervised, free_endpoint, free_port, write_config  # noqa: F401  (re-exported for tests)

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


class NodeProcess:
    """A real node process: ``python -m nodes.<module> --config <path> [--name] [overrides]``.

    ``wait_ready`` waits for ``<run_dir>/ready/<program>.json``; the log is kept in ``log_path`` and
    printed when a wait fails, so a failing test shows why the node did not come up.
    """

    def __init__(self, module: str, config_path: Path, *, name: str = "", program: str = "",
                 args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.module = module
        self.config_path = Path(config_path)
        self.name = name
        self.program = program or (f"{module}-{name}" if name else module)
        self.args = args or []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = self.config_path.parent / f"{self.program}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ready_path(self) -> Path:
        raw = yaml.safe_load(self.config_path.read_text())
        return Path(raw["run_dir"]) / "ready" / f"{self.program}.json"

    def start(self) -> NodeProcess:
        cmd = [PYTHON, "-m", f"nodes.{self.module}", "--config", str(self.config_path)]
        if self.name:
            cmd += ["--name", self.name]
        cmd += self.args
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = 60.0) -> NodeProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready_path.exists():
                return self
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.program} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{self.program} not ready after {timeout_s}s:\n{self.log()[-4000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def node_processes() -> Iterator[list[NodeProcess]]:
    """Collects NodeProcess objects a test starts, and stops them all afterwards."""
    procs: list[NodeProcess] = []
    yield procs
    for proc in reversed(procs):
        proc.stop()


def looping_demo_stack(tmp_path: Path, checkpoint: Path) -> Supervised:
    """The demo role under supervisord (not started yet) on its own XML-RPC port, the panel pointed at it, the
    player looping one 300-frame lift episode and ``checkpoint`` as the policy (5 s timeout)."""
    from common.config import load_config
    from common.tools.demo_data import DemoSpec, generate_demo_dataset

    config = load_config(REPO_ROOT / "configs" / "lift.yaml")
    dataset = generate_demo_dataset(config, tmp_path / "lift-demo", DemoSpec(episodes=1, frames=300),
                                    repo_id="armpipe/lift-demo")
    port = free_port()
    config_path = write_config(tmp_path, "lift", {
        "player": {"dataset": str(dataset), "loop": True},
        "policy": {"checkpoint": str(checkpoint), "timeout_s": 5.0},
        "monitor": {"supervisor_url": f"http://127.0.0.1:{port}/RPC2"},
    })
    return Supervised("demo", "lift", config_path, tmp_path / "run", port)


def start_node(procs: list[NodeProcess], config_path: Path, module: str, name: str = "", *,
               args: list[str] | None = None, ready: bool = True, timeout_s: float = 120.0) -> NodeProcess:
    """Start ``python -m nodes.<module>``, kept in ``procs`` (the ``node_processes`` fixture stops it after the
    test), and with ``ready`` wait for its readiness file."""
    node = NodeProcess(module, config_path, name=name, args=args).start()
    procs.append(node)
    if ready:
        node.wait_ready(timeout_s)
    return node


def wait_for(predicate: Any, timeout_s: float = 10.0, interval_s: float = 0.05, message: str = "") -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail with ``message`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(message or f"condition not met within {timeout_s}s")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``tiny_checkpoint(task="lift", policy_type="diffusion", chunk=0) -> Path`` of a real LeRobot
    ``pretrained_model`` directory built by the project's checkpoint maker (cached per session).
    ``chunk`` sets the rows per reply (0: the maker's default); whole-pipeline tests at 30 fps use a long
    chunk so that rows outlast the CPU policy's round trip."""
    cache: dict[tuple[str, str, int], Path] = {}

    def get(task: str = "lift", policy_type: str = "diffusion", chunk: int = 0) -> Path:
        key = (task, policy_type, chunk)
        if key not in cache:
            from common.config import load_config
            from common.tools.checkpoint_maker import build_checkpoint

            config = load_config(REPO_ROOT / "configs" / f"{task}.yaml")
            output = tmp_path_factory.mktemp(f"ckpt-{task}-{policy_type}-{chunk}")
            cache[key] = build_checkpoint(config, output, policy_type=policy_type, size="tiny", chunk=chunk)
        return cache[key]

    return get
