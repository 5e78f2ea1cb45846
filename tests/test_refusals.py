"""Refusals and crashes under the real supervisord.conf (role robot-sim: every node torch-free).

- A typo written into the running deployment's YAML (``cameras.front.backend: kinect``), then
  ``supervisorctl restart all``: every program that reads it refuses, is spawned exactly once
  (counted in supervisord.log), stays EXITED with exit code 2, and ``make status``
  (``common.tools.status``) names the field; ``supervisorctl`` never answers ``spawn error``.
  camera-front, whose command line overrides that field, runs.
- A good config with one refusing node and one crashing node: the servo emulator refuses a port that
  is a regular file (one spawn, EXITED, the reason in status and on the web panel's node list); a camera
  whose endpoint is taken crashes with exit 1 and is retried with growing back-off (BACKOFF, the crash's
  error line as the reason), and runs as soon as the endpoint is free; kill -9 of a running node still
  brings it back at once. The panel's page (headless Chromium, where installed) shows the refusal.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, free_port, wait_for, write_config
from test_monitor import CHROMIUM, CHROMIUM_ARGS

from bench.harness import Supervised
from common.tools.supervisor_programs import ProgramOptions

pytestmark = pytest.mark.timeout(900)

PROGRAMS = ["servo_emulator-main", "camera-front", "camera-wrist", "state_reader-main", "actuator", "recorder",
            "monitor"]
SPAWNED = re.compile(r"^(\S+ \S+) INFO spawned: '([^']+)' with pid (\d+)")
EXITED = re.compile(r"^(\S+ \S+) \w+ exited: (\S+) \((.*)\)")


def log_events(stack: Supervised, pattern: re.Pattern[str]) -> list[tuple[float, str, str]]:
    """(time, program, detail) for every supervisord.log line matching ``pattern``."""
    events = []
    for line in (stack.run_dir / "logs" / "supervisord.log").read_text().splitlines():
        match = pattern.match(line)
        if match:
            stamp = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            events.append((stamp, match[2], match[3]))
    return events


def spawn_counts(stack: Supervised) -> dict[str, int]:
    counts = dict.fromkeys(PROGRAMS, 0)
    for _, program, _ in log_events(stack, SPAWNED):
        counts[program] = counts.get(program, 0) + 1
    return counts


def status_table(stack: Supervised) -> subprocess.CompletedProcess[str]:
    """``make status`` for this stack: the status tool with its config, over supervisord's socket."""
    return subprocess.run([sys.executable, "-m", "common.tools.status", "--config", str(stack.config_path),
                           "--supervisor-url", stack.client.url], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)


def supervised(tmp_path: Path, overrides: dict) -> Supervised:
    port = free_port()
    config_path = write_config(tmp_path, "lift", {"monitor": {"supervisor_url": f"http://127.0.0.1:{port}/RPC2"},
                                                  **overrides})
    return Supervised("robot-sim", "lift", config_path, tmp_path / "run", port)


def break_config(path: Path, dotted: str, value: object) -> None:
    """Edit one field of the YAML in place, as an operator would (no validation)."""
    raw = yaml.safe_load(path.read_text())
    node = raw
    *parents, key = dotted.split(".")
    for part in parents:
        node = node[part]
    node[key] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_a_config_typo_starts_each_program_once_and_says_why(tmp_path: Path) -> None:
    stack = supervised(tmp_path, {})
    refusing = [name for name in PROGRAMS if name != "camera-front"]
    try:
        stack.start()
        for name in PROGRAMS:  # the actuator of robot-sim is never ready: it has no policy to check against
            stack.wait_ready(name, timeout_s=240) if name != "actuator" else None
        before = spawn_counts(stack)
        # The operator edits the running deployment's YAML with a typo, then restarts one node. Alone it
        # refuses within a second of its spawn, well inside startsecs: the case that used to loop.
        break_config(stack.config_path, "cameras.front.backend", "kinect")
        restart = stack.ctl("restart", stack.full_name("recorder"))
        assert "spawn error" not in restart.stdout + restart.stderr, restart
        wait_for(lambda: stack.process("recorder").state == "EXITED", timeout_s=60, interval_s=0.2,
                 message=f"the recorder did not refuse: {stack.log_tails(['recorder'])}")
        time.sleep(6)  # a crash loop would have respawned it by now (back-off 1 s, then 2 s)
        assert spawn_counts(stack)["recorder"] - before["recorder"] == 1, stack.log_tails(["recorder"])
        recorder = stack.process("recorder")
        assert recorder.state == "EXITED" and recorder.exit_status == 2 and recorder.refused, recorder

        # Then everything: each program that reads the bad field refuses once.
        restart = stack.ctl("restart", "all")
        assert "spawn error" not in restart.stdout + restart.stderr, restart

        def settled() -> bool:
            procs = {p.name: p for p in stack.processes()}
            return all(procs.get(name) and procs[name].state == "EXITED" for name in refusing)

        wait_for(settled, timeout_s=180, interval_s=0.5, message=f"not every program refused: {stack.log_tails()}")
        time.sleep(6)
        procs = {p.name: p for p in stack.processes()}
        counts = spawn_counts(stack)
        for name in refusing:
            spawned = counts[name] - before[name] - (1 if name == "recorder" else 0)
            assert spawned == 1, f"{name} spawned {spawned} times after the restart\n{stack.log_tails([name])}"
            proc = procs[name]
            assert proc.state == "EXITED" and proc.exit_status == 2, (name, proc)
            assert proc.refused and "cameras.front.backend" in proc.reason and "kinect" in proc.reason, proc
        exits = [(program, detail) for _, program, detail in log_events(stack, EXITED)]
        assert all(detail == "exit status 2; expected" for program, detail in exits if program in refusing), exits
        # The program whose command line overrides the bad field is not affected.
        assert procs["camera-front"].state == "RUNNING" and counts["camera-front"] - before["camera-front"] == 1

        status = status_table(stack)
        assert status.returncode == 1  # not everything is up
        assert "does not load" in status.stdout + status.stderr and "cameras.front.backend" in status.stdout, status
        for name in refusing:
            line = next(line for line in status.stdout.splitlines() if f":{name} " in line)
            assert "EXITED" in line and "exit 2; refused:" in line and "kinect" in line, line
    finally:
        stack.shutdown()


STARTSECS = ProgramOptions.startsecs  # the dataclass default: what every program gets


def backoff_runs(stack: Supervised, program: str) -> list[list[float]]:
    """The delays from each failed start of ``program`` (an exit within ``startsecs`` of its spawn) to its next
    spawn, in runs of consecutive failed starts (a run that outlived ``startsecs`` resets supervisord's back-off)."""
    exits = [t for t, name, detail in log_events(stack, EXITED)
             if name == program and detail == "exit status 1; not expected"]
    spawns = [t for t, name, _ in log_events(stack, SPAWNED) if name == program]
    runs: list[list[float]] = [[]]
    for exited in exits:
        spawned = max((s for s in spawns if s < exited), default=None)
        respawned = min((s for s in spawns if s > exited), default=None)
        if spawned is None or respawned is None:
            continue
        if exited - spawned < STARTSECS - 0.3:  # (log stamps are supervisord's, close to but not its checks)
            runs[-1].append(respawned - exited)
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if run]


def test_refusal_crash_backoff_and_kill9_with_reasons_on_the_panel(tmp_path: Path) -> None:
    stack = supervised(tmp_path, {"cameras": {"front": {"backend": "synthetic"}, "wrist": {"backend": "synthetic"}}})
    config = stack.config
    # The servo emulator refuses to replace a regular file at its port (it could be a real device).
    Path(config.arms["main"].port).write_text("not a pty\n")
    # camera-front cannot bind its endpoint while this socket holds it: an exit 1 crash, a restart could fix.
    port = int(config.cameras["front"].endpoint.rsplit(":", 1)[1])
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        stack.start()
        stack.wait_ready("camera-wrist", timeout_s=180)
        stack.wait_ready("monitor", timeout_s=180)

        # The crash is retried, each time after a longer back-off, and says why.
        crashing = wait_for(lambda: (p := stack.process("camera-front")).state == "BACKOFF" and p.reason and p,
                            timeout_s=120, interval_s=0.2, message="camera-front never in BACKOFF with a reason")
        assert "Address already in use" in crashing.reason and not crashing.refused, crashing
        # supervisord waits 1, 2, 3 ... s (checked once a second) between a failed start (an exit within startsecs)
        # and the next spawn. On a loaded machine the crash itself can take longer than startsecs: that run
        # counts as started, its exit is restarted at once and the back-off starts over, so the delays are read
        # along runs of consecutive failed starts.
        delays = wait_for(lambda: (runs := backoff_runs(stack, "camera-front")) and max(map(len, runs)) >= 4
                          and max(runs, key=len), timeout_s=180, interval_s=0.5,
                          message="camera-front was not retried with back-off four times in a row")
        assert all(d >= 0.9 for d in delays) and delays[-1] >= delays[0] + 1.5, delays

        # The refusal: one spawn, EXITED with code 2, the reason in status and on the panel.
        emulator = wait_for(lambda: (p := stack.process("servo_emulator-main")).state == "EXITED" and p,
                            timeout_s=60, interval_s=0.2)
        assert emulator.exit_status == 2 and emulator.refused and "not a symlink" in emulator.reason, emulator
        status = status_table(stack)
        line = next(line for line in status.stdout.splitlines() if ":servo_emulator-main " in line)
        assert "EXITED" in line and "refused: arm main: cannot create the emulated port" in line, status.stdout
        # camera-front cycles BACKOFF -> STARTING -> BACKOFF; a table taken while it is STARTING has no reason.
        def front_line() -> str:
            return next(line for line in status_table(stack).stdout.splitlines() if ":camera-front " in line)

        line = wait_for(lambda: (text := front_line()) and "BACKOFF" in text and text, timeout_s=60, interval_s=0.3,
                        message="camera-front never BACKOFF in the status table")
        assert "last error in its log:" in line and "Address already in use" in line, line
        panel_url = f"http://127.0.0.1:{config.monitor.port}/api/state"

        def panel_programs() -> dict[str, dict]:
            with urllib.request.urlopen(panel_url, timeout=10) as response:
                return {p["name"]: p for p in json.loads(response.read())["nodes"]["programs"]}

        shown = wait_for(lambda: (p := panel_programs()).get("servo_emulator-main", {}).get("refused") and p,
                         timeout_s=30, interval_s=0.5, message="the panel does not show the refusal")
        assert "not a symlink" in shown["servo_emulator-main"]["reason"]
        assert spawn_counts(stack)["servo_emulator-main"] == 1
        if CHROMIUM.exists():  # the page itself: the reason row under the program's row
            from playwright.sync_api import expect, sync_playwright

            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
                try:
                    page = browser.new_page()
                    page.goto(f"http://127.0.0.1:{config.monitor.port}/")
                    why = page.locator('#nodes tr[data-why="servo_emulator-main"]')
                    expect(why).to_contain_text("refused: arm main: cannot create the emulated port", timeout=60_000)
                    expect(why).to_contain_text("not a symlink")
                    expect(page.locator('#nodes tr[data-node="servo_emulator-main"] td.state')).to_have_text("EXITED")
                    expect(page.locator('#nodes tr[data-why="camera-wrist"]')).to_have_count(0)  # running: no row
                finally:
                    browser.close()

        # Once the endpoint is free the next retry runs.
        blocker.close()
        stack.wait_ready("camera-front", timeout_s=120)
        assert not stack.process("camera-front").reason

        # kill -9 of a running node: back at once, as a new process.
        killed = stack.kill9("camera-wrist")
        back = stack.wait_ready("camera-wrist", other_pid=killed, timeout_s=60)
        assert back.pid != killed and not back.reason
        assert spawn_counts(stack)["servo_emulator-main"] == 1  # still not retried
    finally:
        blocker.close()
        stack.shutdown()
