"""The web monitor as a real process: supervisord, the real nodes, and the page in headless Chromium.

- ``SupervisorClient`` against a real supervisord: status, readiness, restart (new pid), unknown names.
- The monitor's HTTP commands without peers: clear messages for an unreachable actuator or supervisord,
  bad bodies and cross-site requests; frames from a real publisher are JPEG-encoded (and downscaled) by
  the monitor.
- The page in Debian's Chromium driven by Playwright, over the real pipeline (camera nodes, policy with a
  tiny checkpoint, dry-run actuator, all under supervisord): frames update, start and stop-with-label
  reach the actuator, a bad command shows its message while the pipeline carries on, a node's restart
  button restarts it (supervisord reports a new pid), and with ``policy.standby`` the two policy
  programs show which one serves, swapped after the serving one's restart.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT, NodeProcess, free_port, wait_for, write_config

from common.config import DeploymentConfig, load_config
from common.supervisor_client import SupervisorClient, UnknownProcess
from common.wire.protocol import KIND_ACTION, KIND_FRAME, KIND_STATE, Message
from common.wire.transport import Publisher, SocketFactory

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SIZE = 64  # camera frames in these tests are 64x64: light, and the tiny policy accepts them


# ----------------------------------------------------------------------------------------------------
# supervisord
# ----------------------------------------------------------------------------------------------------


class Supervisord:
    """A real supervisord with its own config, HTTP port and log directory under tmp_path."""

    def __init__(self, tmp_path: Path, programs: dict[str, str], port: int = 0) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/RPC2"
        self.dir = tmp_path / "supervisor"
        self.dir.mkdir(exist_ok=True)
        sections = [
            "[supervisord]", "nodaemon=true", f"logfile={self.dir}/supervisord.log",
            f"pidfile={self.dir}/supervisord.pid", f"childlogdir={self.dir}", "",
            "[inet_http_server]", f"port=127.0.0.1:{self.port}", "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
            "[supervisorctl]", f"serverurl={self.url.removesuffix('/RPC2')}", "",
        ]
        for name, command in programs.items():
            sections += [f"[program:{name}]", f"command={command}", f"directory={REPO_ROOT}", "autostart=true",
                         "autorestart=true", "startsecs=1", "stopwaitsecs=10", "stopasgroup=true", "killasgroup=true",
                         "redirect_stderr=true", f"stdout_logfile={self.dir}/{name}.log",
                         "environment=PYTHONUNBUFFERED=\"1\"", ""]
        self.conf = self.dir / "supervisord.conf"
        self.conf.write_text("\n".join(sections))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Supervisord:
        supervisord = Path(sys.executable).parent / "supervisord"
        self.proc = subprocess.Popen([str(supervisord), "-c", str(self.conf)], cwd=REPO_ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = SupervisorClient(self.url, timeout_s=1.0)

        def up() -> bool:
            try:
                return bool(client.processes())
            except ConnectionError:
                return False

        wait_for(up, timeout_s=30, message="supervisord did not come up")
        return self

    def log(self, program: str) -> str:
        path = self.dir / f"{program}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # supervisord stops its programs first
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def supervisord_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Supervisord] = []

    def make(programs: dict[str, str], port: int = 0) -> Supervisord:
        supervisor = Supervisord(tmp_path, programs, port).start()
        started.append(supervisor)
        return supervisor

    yield make
    for supervisor in started:
        supervisor.stop()


SLEEPER = f"{sys.executable} -c \"import time; time.sleep(3600)\""


def test_supervisor_client_status_readiness_and_restart(tmp_path: Path, supervisord_factory: Any) -> None:
    ready_dir = tmp_path / "run" / "ready"
    ready_dir.mkdir(parents=True)
    # A node behind a shell wrapper (sh does not exec it: "; true"): its ready file names the child's pid.
    script = tmp_path / "wrapped_node.py"
    script.write_text(f"import json, os, time\nopen({str(ready_dir / 'wrapped.json')!r}, 'w').write(json.dumps("
                      "{'pid': os.getpid(), 'since': time.time()}))\ntime.sleep(3600)\n")
    wrapped = f"sh -c '{sys.executable} {script}; true'"
    supervisor = supervisord_factory({"sleeper": SLEEPER, "other": SLEEPER, "wrapped": wrapped})
    client = SupervisorClient(supervisor.url, ready_dir=ready_dir)
    wait_for(lambda: all(p.state == "RUNNING" for p in client.processes()), timeout_s=20)
    wait_for(lambda: {p.name: p for p in client.processes()}["wrapped"].ready, timeout_s=20,
             message="a wrapped node's readiness is not recognised")
    before = {p.name: p for p in client.processes()}
    assert set(before) == {"sleeper", "other", "wrapped"}
    assert before["sleeper"].pid > 0 and before["sleeper"].ready is False  # no readiness file yet
    # A readiness file counts only for the pid supervisord runs now.
    (ready_dir / "sleeper.json").write_text(json.dumps({"pid": before["sleeper"].pid, "since": time.time()}))
    (ready_dir / "other.json").write_text(json.dumps({"pid": 1 << 22, "since": time.time()}))  # no such process
    statuses = {p.name: p for p in client.processes()}
    assert statuses["sleeper"].ready is True and statuses["other"].ready is False

    restarted = client.restart("sleeper")
    assert restarted.state == "RUNNING" and restarted.pid not in (0, before["sleeper"].pid)
    assert {p.name: p for p in client.processes()}["other"].pid == before["other"].pid  # only that one
    assert restarted.ready is False  # the readiness file still names the old pid: stale until the node rewrites it
    with pytest.raises(UnknownProcess) as unknown:
        client.restart("nope")
    assert "nope" in str(unknown.value) and unknown.value.known == ["other", "sleeper", "wrapped"]
    supervisor.stop()
    with pytest.raises(ConnectionError, match="not reachable"):
        client.processes()


# ----------------------------------------------------------------------------------------------------
# HTTP commands without peers
# ----------------------------------------------------------------------------------------------------


def post(url: str, body: bytes = b"{}", headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=20) as response:
        return json.loads(response.read())


def small_cameras(task: str = "lift", width: int = SIZE, height: int = SIZE) -> dict[str, Any]:
    raw = yaml.safe_load((REPO_ROOT / "configs" / f"{task}.yaml").read_text())
    return {name: {"width": width, "height": height} for name in raw["cameras"]}


def test_commands_report_missing_peers_and_bad_requests(tmp_path: Path, node_processes: list) -> None:
    config_path = write_config(tmp_path, "lift", {
        "cameras": small_cameras(), "monitor": {"supervisor_url": f"http://127.0.0.1:{free_port()}/RPC2",
                                                "control_timeout_s": 0.3, "max_width": 320}})
    config = load_config(config_path)
    monitor = NodeProcess("monitor", config_path)
    node_processes.append(monitor)
    monitor.start().wait_ready(60)
    base = f"http://127.0.0.1:{config.monitor.port}"

    status, reply = post(f"{base}/api/episode/start")
    assert status == 503 and not reply["ok"]
    assert "actuator unreachable" in reply["message"] and config.actuator.control_endpoint in reply["message"]
    status, reply = post(f"{base}/api/nodes/actuator/restart")
    assert status == 503 and "supervisord" in reply["message"] and "not reachable" in reply["message"]
    status, reply = post(f"{base}/api/episode/stop", b'{"label": "great"}')
    assert status == 400 and "label" in reply["message"] and "success" in reply["message"]
    status, reply = post(f"{base}/api/episode/start", b'{"episode_index": "seven"}')
    assert status == 400 and reply["message"].startswith("episode_index: expected int")
    status, reply = post(f"{base}/api/episode/start", b"not json")
    assert status == 400 and "expected JSON" in reply["message"]
    status, reply = post(f"{base}/api/episode/fly")
    assert status == 404 and "unknown episode command 'fly'" in reply["message"]
    status, reply = post(f"{base}/api/episode/start", headers={"Origin": "http://evil.example"})
    assert status == 403 and "cross-origin" in reply["message"]

    # Frames from a real publisher come back JPEG-encoded by the monitor, wide ones downscaled.
    publisher = Publisher(SocketFactory(), config.cameras["front"].endpoint, "camera-front")
    image = np.zeros((240, 640, 3), dtype=np.uint8)
    image[:, :320] = (200, 30, 30)  # left half red, right half black

    def shown() -> dict[str, Any] | None:
        publisher.publish(Message(kind=KIND_FRAME, meta={"camera": "front", "source": "camera"},
                                  arrays={"image": image}))
        frames = get_json(f"{base}/api/state")["frames"]
        return next((frame for frame in frames if frame["camera"] == "front"), None)

    try:
        frame = wait_for(shown, timeout_s=20, interval_s=0.1, message="the monitor never showed the frame")
    finally:
        publisher.close()
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(frame["jpeg"]), np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (120, 320, 3)  # max_width=320: half size
    assert (frame["width"], frame["height"]) == (640, 240)  # the camera's own size is reported
    b, g, r = decoded[60, 80]
    assert r > 150 and g < 80 and b < 80 and decoded[60, 240].max() < 40
    assert monitor.proc.poll() is None


def strict_json(text: str | bytes) -> Any:
    """JSON as a browser's JSON.parse reads it: NaN / Infinity are errors, not numbers."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_a_hold_without_a_known_position_reaches_the_page_as_null(tmp_path: Path, node_processes: list) -> None:
    # Before the first state arrives the actuator's hold target is NaN ("no position known"). The page
    # parses with JSON.parse, which rejects NaN: one such tick must not spoil the snapshot or the stream.
    config_path = write_config(tmp_path, "lift", {
        "cameras": small_cameras(), "monitor": {"supervisor_url": f"http://127.0.0.1:{free_port()}/RPC2"}})
    config = load_config(config_path)
    monitor = NodeProcess("monitor", config_path)
    node_processes.append(monitor)
    monitor.start().wait_ready(60)
    base = f"http://127.0.0.1:{config.monitor.port}"
    events = Publisher(SocketFactory(), config.actuator.events_endpoint, "actuator")
    target = np.array([np.nan, 1.0, np.inf, 2.0, -np.inf, 3.0], dtype=np.float32)

    def shown() -> list[Any] | None:
        events.publish(Message(kind=KIND_ACTION, meta={"role": "executed", "hold": True,
                                                        "hold_reason": "policy_unreachable", "episode_index": -1,
                                                        "names": config.action_names(), "lateness_s": float("nan")},
                               arrays={"action": target}))
        series = strict_json(urlopen_bytes(f"{base}/api/state"))["series"]["action"]
        return series[-1]["values"] if series else None

    try:
        values = wait_for(shown, timeout_s=20, interval_s=0.1, message="the monitor never showed the action")
    finally:
        events.close()
    assert values == [None, 1.0, None, 2.0, None, 3.0]
    # The event stream's first message (the snapshot a page draws from) is strict JSON as well.
    with urllib.request.urlopen(f"{base}/events", timeout=20) as stream:
        lines = []
        while not (lines and lines[-1].startswith(b"data: ")):
            lines.append(stream.readline().rstrip(b"\n"))
    assert lines[-2] == b"event: snapshot"
    snapshot = strict_json(lines[-1].removeprefix(b"data: "))
    assert snapshot["series"]["action"][-1]["values"] == [None, 1.0, None, 2.0, None, 3.0]
    assert snapshot["config"]["task"] == "lift"
    assert monitor.proc.poll() is None


def urlopen_bytes(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=20) as response:
        return response.read()


# ----------------------------------------------------------------------------------------------------
# The page in Chromium over the real pipeline
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained DiffusionPolicy for the lift layout with 64x64 cameras (the checkpoint maker)."""
    from common.tools.checkpoint_maker import build_checkpoint

    directory = tmp_path_factory.mktemp("ckpt-small")
    config = load_config(write_config(directory, "lift", {"cameras": small_cameras()}))
    return build_checkpoint(config, directory / "lift-small", policy_type="diffusion", size="tiny")


class StateFeed:
    """The arm's joint state at 20 Hz from a real publisher (the state-reader needs a servo bus)."""

    def __init__(self, config: DeploymentConfig) -> None:
        self.config = config
        self.publishers = {name: Publisher(SocketFactory(), arm.state_endpoint, f"state_reader-{name}")
                           for name, arm in config.arms.items()}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        k = 0
        while not self.stop.wait(0.05):
            k += 1
            for name, publisher in self.publishers.items():
                position = (10 * np.sin(k / 20 + np.arange(6))).astype(np.float32)
                position[5] = 50.0
                publisher.publish(Message(kind=KIND_STATE, meta={
                    "arm": name, "names": self.config.arms[name].joint_names(), "source": "test"},
                    arrays={"position": position}))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        for publisher in self.publishers.values():
            publisher.close()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium")
def test_panel_in_chromium(tmp_path: Path, small_checkpoint: Path, supervisord_factory: Any) -> None:
    from playwright.sync_api import expect, sync_playwright

    supervisor_port = free_port()
    config_path = write_config(tmp_path, "lift", {
        "cameras": {name: {"fps": 15, **size} for name, size in small_cameras().items()},
        "policy": {"checkpoint": str(small_checkpoint), "timeout_s": 10.0, "standby": True},
        "actuator": {"dry_run": True},
        "monitor": {"supervisor_url": f"http://127.0.0.1:{supervisor_port}/RPC2"},
    })
    config = load_config(config_path)
    node = f"{sys.executable} -m nodes.%s --config {config_path}"
    programs = {f"camera-{name}": node % "camera" + f" --name {name}" for name in config.cameras}
    # policy.standby: two policy programs, as the generated server programs run them (the standby knows
    # itself by supervisord's SUPERVISOR_PROCESS_NAME).
    programs |= {"policy": node % "policy", "policy-standby": node % "policy", "actuator": node % "actuator",
                 "monitor": node % "monitor"}
    supervisor = supervisord_factory(programs, supervisor_port)
    feed = StateFeed(config)
    feed.thread.start()
    ready_dir = Path(config.run_dir) / "ready"
    try:
        try:
            wait_for(lambda: all((ready_dir / f"{program}.json").exists()
                                 for program in ("actuator", "policy", "policy-standby", "monitor")), timeout_s=240)
        except AssertionError as exc:
            logs = "\n".join(supervisor.log(program) for program in ("policy", "policy-standby", "actuator",
                                                                        "monitor"))
            raise AssertionError(f"pipeline not ready:\n{logs}") from exc
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{config.monitor.port}/")
                try:
                    drive_panel(page, expect, supervisor, config, tmp_path / "panel.png")
                except AssertionError as exc:
                    page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
                    message = page.locator("#message").inner_text()
                    logs = "\n".join(f"--- {name}\n{supervisor.log(name)}" for name in ("monitor", "actuator"))
                    raise AssertionError(f"{exc}\npage message: {message!r}\n{logs}") from exc
            finally:
                browser.close()
    finally:
        feed.close()


def camera_seq(page: Any, camera: str) -> int:
    return int(page.locator(f"#camera-{camera} img").get_attribute("data-seq") or -1)


def drive_panel(page: Any, expect: Any, supervisor: Supervisord, config: DeploymentConfig, screenshot: Path) -> None:
    expect(page.locator("#connection")).to_have_text("live", timeout=20_000)
    # "live" is the stream's headers; the snapshot that fills the page follows, and on a loaded 2-core box
    # (the policy warming up beside Chromium) it can take longer than Playwright's 5 s default.
    expect(page.locator("#task")).to_contain_text("lift", timeout=30_000)

    # Camera frames update (by push), every camera.
    for camera in config.cameras:
        first = wait_for(lambda c=camera: camera_seq(page, c) > 0 and camera_seq(page, c), timeout_s=30,
                         message=f"no frame from {camera}")
        wait_for(lambda c=camera, f=first: camera_seq(page, c) > f, timeout_s=10, message=f"{camera} frozen")
        src = page.locator(f"#camera-{camera} img").get_attribute("src") or ""
        assert src.startswith("data:image/jpeg;base64,")

    # Every node's status comes from supervisord, with readiness; the two policy processes say which serves.
    # The one that serves is whichever took the serving lock first, so the test reads it off the page.
    for program in ("actuator", "monitor", *(f"camera-{name}" for name in config.cameras)):
        row = page.locator(f'#nodes tr[data-node="{program}"]')
        expect(row.locator("td.state")).to_have_text("RUNNING", timeout=30_000)
        expect(row.locator("td.ready")).to_have_text("yes", timeout=60_000)
    serving, standby = policy_roles(page, expect)
    expect(page.locator("#contract")).to_have_text("ok", timeout=30_000)
    # The task instruction a language policy gets: the config's (actuator.instruction), asked of the actuator.
    expect(page.locator("#instruction-now")).to_have_text(f"“{config.actuator.instruction}”", timeout=30_000)

    # Start, then stop with a label: both reach the actuator, whose events come back to the page.
    page.click("#btn-start")
    expect(page.locator("#message")).to_have_text("episode 0 started", timeout=20_000)
    expect(page.locator("#message")).to_have_class("ok", timeout=20_000)
    expect(page.locator("#episode")).to_have_text("0 running", timeout=20_000)
    expect(page.locator("#actuator-state")).to_have_text("running", timeout=20_000)
    expect(page.locator("#timing-latest")).to_contain_text("round trip", timeout=30_000)  # chunks arrive
    page.screenshot(path=str(screenshot), full_page=True)  # kept in tmp_path for a human to look at
    page.click("#btn-stop-success")
    expect(page.locator("#message")).to_have_text("episode 0 stopped (success)", timeout=20_000)
    expect(page.locator("#episode")).to_have_text("0 stopped (success)", timeout=20_000)

    # Between episodes the instruction changes from the page; the actuator's reply and its event show it.
    expect(page.locator("#actuator-state")).to_have_text("idle", timeout=60_000)  # back at its rest pose
    page.fill("#instruction", "put the red cube in the box")
    page.click("#btn-instruction")
    expect(page.locator("#message")).to_have_text("instruction set: 'put the red cube in the box'", timeout=20_000)
    expect(page.locator("#instruction-now")).to_have_text("“put the red cube in the box”", timeout=20_000)

    # Bad commands: a clear message on the page, and the pipeline carries on.
    actuator_pid = page.locator('#nodes tr[data-node="actuator"] td.pid').inner_text()
    page.click("#btn-stop-failure")  # nothing is running any more
    expect(page.locator("#message")).to_have_class("error", timeout=20_000)
    expect(page.locator("#message")).to_contain_text("no episode is running", timeout=20_000)
    reply = page.evaluate("""async () => {
        const response = await fetch('/api/nodes/no-such-node/restart', {method: 'POST'});
        return {status: response.status, body: await response.json()};
    }""")
    assert reply["status"] == 404 and "unknown node 'no-such-node'" in reply["body"]["message"]
    assert "actuator" in reply["body"]["message"]  # names what supervisord does run
    # The monitor cannot restart itself (it would be stopped before it could start itself again).
    expect(page.locator('#nodes tr[data-node="monitor"] button.restart')).to_have_count(0, timeout=20_000)
    reply = page.evaluate("""async () => {
        const response = await fetch('/api/nodes/monitor/restart', {method: 'POST'});
        return {status: response.status, body: await response.json()};
    }""")
    assert reply["status"] == 409 and "cannot restart itself" in reply["body"]["message"]
    page.click("#btn-start")
    expect(page.locator("#message")).to_have_text("episode 1 started", timeout=20_000)
    # During an episode the actuator refuses a new instruction, and the page says why.
    page.fill("#instruction", "stack the cubes")
    page.click("#btn-instruction")
    expect(page.locator("#message")).to_have_class("error", timeout=20_000)
    expect(page.locator("#message")).to_contain_text("between episodes", timeout=20_000)
    expect(page.locator("#instruction-now")).to_have_text("“put the red cube in the box”")
    page.click("#btn-stop-failure")
    expect(page.locator("#message")).to_have_text("episode 1 stopped (failure)", timeout=20_000)
    assert page.locator('#nodes tr[data-node="actuator"] td.pid').inner_text() == actuator_pid

    # A node restarts from its button: supervisord reports a new pid, and its frames come back.
    row = page.locator('#nodes tr[data-node="camera-front"]')
    old_pid = row.locator("td.pid").inner_text()
    row.locator("button.restart").click()
    expect(page.locator("#message")).to_contain_text("camera-front restarted", timeout=60_000)
    expect(row.locator("td.pid")).not_to_have_text(old_pid, timeout=20_000)
    expect(row.locator("td.state")).to_have_text("RUNNING", timeout=20_000)
    new_pid = int(row.locator("td.pid").inner_text())
    assert os.path.exists(f"/proc/{new_pid}") and new_pid != int(old_pid)
    seq = camera_seq(page, "front")
    wait_for(lambda: camera_seq(page, "front") != seq, timeout_s=60, message="frames did not come back after restart")

    # Restarting the serving policy from its button: the standby takes over, and the restarted one comes back
    # as the standby; the page shows the roles swapped.
    page.locator(f'#nodes tr[data-node="{serving}"] button.restart').click()
    expect(page.locator("#message")).to_contain_text(f"{serving} restarted", timeout=60_000)
    expect(page.locator(f'#nodes tr[data-node="{standby}"] td.ready')).to_have_text("yes (serving)", timeout=60_000)
    expect(page.locator(f'#nodes tr[data-node="{serving}"] td.ready')).to_have_text("yes (standby)", timeout=120_000)


def policy_roles(page: Any, expect: Any) -> tuple[str, str]:
    """The serving and the standby policy program, once the page shows both ready with their roles."""
    cells = {program: page.locator(f'#nodes tr[data-node="{program}"] td.ready')
             for program in ("policy", "policy-standby")}
    for cell in cells.values():
        expect(cell).to_have_text(re.compile(r"^yes \((serving|standby)\)$"), timeout=60_000)
    roles = {program: cell.get_attribute("data-role") for program, cell in cells.items()}
    assert sorted(roles.values()) == ["serving", "standby"], roles  # exactly one process serves
    serving = next(program for program, role in roles.items() if role == "serving")
    return serving, next(program for program in cells if program != serving)
