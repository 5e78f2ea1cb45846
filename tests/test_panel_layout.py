"""The panel's layout and charts in headless Chromium (issue 25, items 2 and 4), for the sort layout (three
cameras, two arms, twelve joints) at 1280, 1600 and 1920 px.

The monitor runs as a real process under a real supervisord (beside stand-in programs named as the sort
robot's nodes, so the Nodes table is as long as a real one); the test publishes on the pipeline's streams
what the cameras, state-readers, player and actuator publish. Checked: no horizontal overflow, the restart
buttons inside the Nodes card, camera images filling their tiles, every chart with data drawing it (the
pixels of its colour are on the canvas), integer queue-depth labels, no executed trace over the state
while the actuator holds, the events box showing a long message whole, a favicon, and an actuator that
refuses to move shown as plainly as a refused (EXITED) node.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import free_port, wait_for, write_config
from test_monitor import CHROMIUM, CHROMIUM_ARGS, Supervisord

from common.config import DeploymentConfig, load_config
from common.wire.protocol import KIND_ACTION, KIND_EVENT, KIND_FRAME, KIND_STATE, Message
from common.wire.transport import Publisher, SocketFactory

WIDTHS = (1280, 1600, 1920)
UNITS_MESSAGE = ("units mismatch: the policy's dataset is in LeRobot's -100..100 range mode, the arms in degrees: "
                 "left_shoulder_pan.pos dataset -98.2..97.5, config -110.0..110.0; left_shoulder_lift.pos dataset "
                 "-99.1..99.0, config -100.0..100.0; set arms.<arm>.use_degrees: false, or "
                 "actuator.units_mismatch_intended: true if this is intended")
REFUSING = ("refuses to move: the policy's contract does not match the config: state names differ: the policy "
            "expects left_shoulder_pan.pos ... (12), the config has shoulder_pan.pos ... (6)")


class SortFeed:
    """What the sort pipeline publishes, from real publishers on the config's endpoints."""

    def __init__(self, config: DeploymentConfig) -> None:
        self.config = config
        factory = SocketFactory()
        self.cameras = {name: Publisher(factory, cam.endpoint, f"camera-{name}")
                        for name, cam in config.cameras.items()}
        self.arms = {name: Publisher(factory, arm.state_endpoint, f"state_reader-{name}")
                     for name, arm in config.arms.items()}
        self.events = Publisher(factory, config.actuator.events_endpoint, "actuator")
        self.refusing = threading.Event()  # the actuator holds (contract mismatch) while the state moves
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.images = {name: self._image(index, cam.height, cam.width)
                       for index, (name, cam) in enumerate(config.cameras.items())}

    @staticmethod
    def _image(index: int, height: int, width: int) -> np.ndarray:
        image = np.zeros((height, width, 3), dtype=np.uint8)
        image[:] = (60 + 60 * index, 90, 160)
        image[: height // 8] = 255  # a bright top band: where the picture starts is visible on the page
        return image

    def run(self) -> None:
        names = self.config.action_names()
        period = 1.0 / self.config.fps
        k = 0
        last_chunk = last_stats = 0.0
        while not self.stop.wait(period):
            k += 1
            now = time.monotonic()
            state = (20 * np.sin(k / 15 + np.arange(len(names)))).astype(np.float32)
            for index, (name, publisher) in enumerate(self.arms.items()):
                publisher.publish(Message(kind=KIND_STATE, meta={
                    "arm": name, "names": self.config.arms[name].joint_names(), "source": "dataset"},
                    arrays={"position": state[index * 6:(index + 1) * 6].copy()}))
            if k % 3 == 0:
                for name, publisher in self.cameras.items():
                    publisher.publish(Message(kind=KIND_FRAME, meta={"camera": name, "source": "dataset"},
                                              arrays={"image": self.images[name]}))
            refusing = self.refusing.is_set()
            # Holds in bands (as the actuator's red shading shows them); refusing: every tick holds, at the state.
            hold = refusing or (k // 20) % 4 == 3
            reason = "contract_mismatch" if refusing else "queue_empty" if hold else ""
            depth = 0 if hold else 7 - (k % 8)
            action = state if refusing else (state + 3).astype(np.float32)
            self.events.publish(Message(kind=KIND_ACTION, t=now, meta={
                "role": "executed", "names": names, "tick": k, "hold": hold, "hold_reason": reason,
                "episode_index": 0, "obs_t": now - 0.05, "inputs": {}, "frame_index": k, "queue_depth": depth,
                "lateness_s": 0.001}, arrays={"action": action}))
            if not hold:
                self.events.publish(Message(kind=KIND_EVENT, t=now, meta={
                    "event": "latency", "tick": k, "row": k % 8, "first_row": k % 8 == 0,
                    "end_to_end_s": 0.08 + 0.02 * np.sin(k / 7), "stages": {"inference": 0.05, "to_tick": 0.03}}))
            if now - last_chunk > 0.6 and not refusing:
                last_chunk = now
                self.events.publish(Message(kind=KIND_EVENT, t=now, meta={
                    "event": "chunk", "rows": 48, "dropped_stale": 2, "obs_t": now - 0.3,
                    "round_trip_s": 0.3 + 0.05 * np.sin(k), "queue_depth": depth,
                    "timings": {"inference_s": 0.2, "total_s": 0.25}},
                    arrays={"chunk": np.tile(state + 2, (48, 1)).astype(np.float32)}))
            if now - last_stats > 1.0:
                last_stats = now
                self.events.publish(Message(kind=KIND_EVENT, t=now, meta={
                    "event": "loop_stats", "lateness_p50_s": 0.001, "lateness_p99_s": 0.004, "ticks": k,
                    "holds": {"queue_empty": k // 80, **({"contract_mismatch": 1} if refusing else {})},
                    "queue_depth": depth, "state": "running", "contract_ok": not refusing}))

    def unit_mismatch(self) -> None:
        self.events.publish(Message(kind=KIND_EVENT, meta={"event": "units_mismatch",
                                                           "differences": [UNITS_MESSAGE]}))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        for publisher in (*self.cameras.values(), *self.arms.values(), self.events):
            publisher.close()


LAYOUT_PROBE = """() => {
  const doc = document.documentElement;
  const card = document.querySelector('#nodes').closest('section').getBoundingClientRect();
  const buttons = [...document.querySelectorAll('#nodes button.restart')].map((b) => b.getBoundingClientRect());
  const tiles = [...document.querySelectorAll('#cameras .camera')].map((figure) => {
    const tile = figure.getBoundingClientRect();
    const img = figure.querySelector('img');
    const box = img.getBoundingClientRect();
    // The picture inside the img box (object-fit: contain keeps its aspect ratio).
    const scale = Math.min(box.width / img.naturalWidth, box.height / img.naturalHeight);
    return {tile: tile.width * tile.height, picture: img.naturalWidth * scale * img.naturalHeight * scale,
            loaded: img.naturalWidth > 0};
  });
  const log = document.querySelector('#log li');
  return {
    scrollWidth: doc.scrollWidth, clientWidth: doc.clientWidth,
    card: {left: card.left, right: card.right},
    buttons: buttons.map((b) => ({left: b.left, right: b.right})),
    tiles,
    logClipped: log ? log.scrollWidth > log.clientWidth + 1 : null,
  };
}"""

# Pixels of a chart's series colour on its canvas (the page's CSS variables give the colours).
COLOUR_PIXELS = """([selector, variable]) => {
  const canvas = document.querySelector(selector);
  const hex = getComputedStyle(document.documentElement).getPropertyValue(variable).trim();
  const want = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let count = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3] > 200 && Math.abs(data[i] - want[0]) < 40 && Math.abs(data[i + 1] - want[1]) < 40
        && Math.abs(data[i + 2] - want[2]) < 40) count++;
  }
  return count;
}"""


def favicon_status(port: int) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/favicon.ico", timeout=10) as response:
        return response.status, response.headers.get("Content-Type", "")


@pytest.fixture
def supervisors() -> Iterator[list[Supervisord]]:
    started: list[Supervisord] = []
    yield started
    for supervisor in started:
        supervisor.stop()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium")
def test_panel_layout_and_charts_at_three_widths(tmp_path: Path, supervisors: list[Supervisord]) -> None:
    from playwright.sync_api import expect, sync_playwright

    supervisor_port = free_port()
    config_path = write_config(tmp_path, "sort", {
        # A short history: the charts' window (and what a newly opened page gets) is 4 s.
        "monitor": {"supervisor_url": f"http://127.0.0.1:{supervisor_port}/RPC2", "history_s": 4.0}})
    config = load_config(config_path)
    sleeper = f"{sys.executable} -c \"import time; time.sleep(3600)\""
    # The sort robot's programs (stand-ins that only run), and the real monitor.
    programs = {name: sleeper for name in ("actuator", "policy", "recorder", "dataset_player",
                                           *(f"camera-{c}" for c in config.cameras),
                                           *(f"state_reader-{a}" for a in config.arms),
                                           *(f"servo_emulator-{a}" for a in config.arms))}
    programs["monitor"] = f"{sys.executable} -m nodes.monitor --config {config_path}"
    # A node that refuses (exit 2, EXITED, its reason in <run_dir>/refused/), as the player does on a bad dataset.
    programs["dataset_player"] = (f"{sys.executable} -c \"from common.refusal import refuse; refuse("
                                  f"'config field player.dataset: no dataset directory at data/x', "
                                  f"run_dir='{config.run_dir}')\"")
    supervisor = Supervisord(tmp_path, programs, supervisor_port).start()
    supervisors.append(supervisor)
    ready_dir = Path(config.run_dir) / "ready"
    wait_for(lambda: (ready_dir / "monitor.json").exists(), timeout_s=120,
             message=f"monitor not ready:\n{supervisor.log('monitor')}")
    feed = SortFeed(config)
    feed.thread.start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                for width in WIDTHS:
                    page = browser.new_page(viewport={"width": width, "height": 1000})
                    missing: list[str] = []
                    page.on("response", lambda r, m=missing: m.append(r.url) if r.status == 404 else None)
                    page.goto(f"http://127.0.0.1:{config.monitor.port}/")
                    expect(page.locator("#connection")).to_have_text("live", timeout=20_000)
                    expect(page.locator('#nodes tr[data-node="actuator"] td.state')).to_have_text("RUNNING",
                                                                                                   timeout=30_000)
                    wait_for(lambda p=page: p.evaluate(LAYOUT_PROBE)["tiles"]
                             and all(t["loaded"] for t in p.evaluate(LAYOUT_PROBE)["tiles"]), timeout_s=30,
                             message="camera frames never shown")
                    expect(page.locator("#timing-latest")).to_contain_text("round trip", timeout=20_000)
                    expect(page.locator("#latency-latest")).to_contain_text("p50", timeout=20_000)
                    time.sleep(1.5)  # a few redraws with data in every chart
                    probe = page.evaluate(LAYOUT_PROBE)
                    shot = tmp_path / f"panel-{width}.png"
                    page.screenshot(path=str(shot), full_page=True)
                    assert probe["scrollWidth"] <= probe["clientWidth"], (width, probe)
                    for button in probe["buttons"]:
                        assert probe["card"]["left"] <= button["left"] and button["right"] <= probe["card"]["right"], \
                            (width, button, probe["card"])
                    for tile in probe["tiles"]:
                        assert tile["picture"] >= 0.8 * tile["tile"], (width, probe["tiles"])
                    charts = {"#timing-chart": "--action", "#latency-chart": "--gt", "#queue-chart": "--state",
                              "#joints canvas": "--state"}
                    for selector, colour in charts.items():
                        assert page.evaluate(COLOUR_PIXELS, [selector, colour]) > 20, (width, selector)
                    labels = json.loads(page.locator("#queue-chart").get_attribute("data-axis-labels") or "[]")
                    assert len(labels) >= 2 and all(float(label).is_integer() for label in labels), labels
                    assert not [url for url in missing if "favicon" in url], missing
                    page.close()

                # The actuator refuses to move (it holds every tick, at the state) while the replayed state
                # moves: no executed trace is drawn over the state, as if the arm followed it.
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.goto(f"http://127.0.0.1:{config.monitor.port}/")
                expect(page.locator("#connection")).to_have_text("live", timeout=20_000)
                feed.refusing.set()
                feed.unit_mismatch()
                # Its readiness file says why it refuses (as the actuator writes it): the Nodes table shows it as
                # plainly as the refused, EXITED dataset player: REFUSES, and the reason under the row.
                actuator_pid = wait_for(lambda: supervisor_pid(supervisor, "actuator"), timeout_s=10)
                (ready_dir / "actuator.json").write_text(json.dumps({
                    "pid": actuator_pid, "since": time.time(), "contract": "mismatch", "refusing": REFUSING,
                    "differences": ["state names differ"]}))
                expect(page.locator('#nodes tr[data-why="dataset_player"]')).to_contain_text(
                    "refused: config field player.dataset", timeout=30_000)
                why = page.locator('#nodes tr[data-why="actuator"]')
                expect(why).to_contain_text(REFUSING, timeout=20_000)
                expect(page.locator('#nodes tr[data-node="actuator"] td.ready')).to_have_text("REFUSES",
                                                                                               timeout=20_000)
                refused_why = page.locator('#nodes tr[data-why="dataset_player"]')
                assert why.get_attribute("class") == refused_why.get_attribute("class") == "why refused"
                assert why.evaluate("(row) => getComputedStyle(row.querySelector('td')).color") == \
                    refused_why.evaluate("(row) => getComputedStyle(row.querySelector('td')).color")
                time.sleep(config.monitor.history_s + 1)  # the ticks from before the refusal leave the window
                assert page.evaluate(COLOUR_PIXELS, ["#joints canvas", "--action"]) < 5
                assert page.evaluate(COLOUR_PIXELS, ["#joints canvas", "--state"]) > 20
                # The units message is shown whole in the events box (wrapped, not cut off).
                entry = page.locator("#log li", has_text="units mismatch")
                expect(entry).to_contain_text("actuator.units_mismatch_intended", timeout=20_000)
                assert page.evaluate(LAYOUT_PROBE)["logClipped"] is False
                assert entry.evaluate("(li) => li.scrollWidth <= li.clientWidth + 1")
                shot = tmp_path / "panel-refusing.png"
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
        assert favicon_status(config.monitor.port) == (200, "image/svg+xml")
    finally:
        feed.close()  # the screenshots stay in tmp_path for a person to look at


def supervisor_pid(supervisor: Any, program: str) -> int:
    from common.supervisor_client import SupervisorClient

    for status in SupervisorClient(supervisor.url, timeout_s=2.0).processes():
        if status.name == program and status.pid:
            return int(status.pid)
    return 0
