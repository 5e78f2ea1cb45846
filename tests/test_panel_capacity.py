"""The policy node's capacity in the panel, real processes and a real browser: a policy node (tiny
DiffusionPolicy, CPU) serving two robots' sessions and the monitor that asks it for its figures over the policy
link (its ``ping`` reply); the page in Debian's Chromium shows chunks/s, the sessions served, batch sizes and
queue wait, and says so when the policy node is gone."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from conftest import NodeProcess, free_port, wait_for, write_config
from test_monitor import CHROMIUM, CHROMIUM_ARGS
from test_policy_node import SMALL, client, observation

from common.config import load_config
from common.tools.checkpoint_maker import build_checkpoint
from common.wire.transport import SocketFactory

MAX_BATCH = 8


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium")
def test_panel_shows_the_policy_capacity(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    small = {"cameras": {"front": SMALL, "wrist": SMALL}}
    checkpoint = build_checkpoint(load_config(write_config(tmp_path, "lift", small)), tmp_path / "checkpoint",
                                  policy_type="diffusion", size="tiny")
    config_path = write_config(tmp_path, "lift", {**small, "policy": {
        "checkpoint": str(checkpoint), "cpu_threads": 1, "warmup": 1, "noise_scheduler": "DDIM",
        "num_inference_steps": 2, "max_batch": MAX_BATCH, "batch_window_ms": 20, "capacity_period_s": 1.0,
        "timeout_s": 20.0}})
    config = load_config(config_path)
    policy = NodeProcess("policy", config_path).start()
    monitor = NodeProcess("monitor", config_path).start()
    stop = threading.Event()
    failures: list[BaseException] = []

    def robot(name: str, seed: int) -> None:
        """A robot asking for chunks back to back until the test ends."""
        try:
            policy_client = client(config, name)
            images, state = observation(config, seed)
            step = 0
            while not stop.is_set():
                policy_client.infer(images, state, obs_t=float(step))
                step += 1
            policy_client.close()
        except BaseException as exc:  # reported by the test
            failures.append(exc)

    robots = [threading.Thread(target=robot, args=(f"robot-{index}", index), daemon=True) for index in range(2)]
    try:
        policy.wait_ready(timeout_s=180)
        monitor.wait_ready(timeout_s=60)
        for thread in robots:
            thread.start()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{config.monitor.port}/")
                expect(page.locator("#connection")).to_have_text("live", timeout=20_000)
                # The node rolls its figures once a second (policy.capacity_period_s), the monitor asks every 2 s:
                # a period in which both robots were served, in batches of at most max_batch. The box is read in
                # one go (it is redrawn whole on each push), until a period shows both robots.
                def shown() -> dict[str, str]:
                    return page.locator("#capacity dd").evaluate_all(
                        "(nodes) => Object.fromEntries(nodes.map((n) => [n.dataset.key, n.textContent]))")

                figures = wait_for(lambda: (box := shown()).get("sessions served") == "2" and box, timeout_s=60,
                                   message="no period with both robots served")
                assert float(figures["chunks/s"]) > 0, figures
                match = re.fullmatch(rf"mean ([\d.]+) · max (\d+) of {MAX_BATCH}", figures["batch size"])
                assert match and 1 <= float(match[1]) <= int(match[2]) <= 2, figures
                assert re.fullmatch(r"p50 [\d.]+ ms · p99 [\d.]+ ms", figures["queue wait"]), figures
                expect(page.locator("#capacity-note")).to_contain_text("over its last")
                assert not failures, failures

                # The policy node gone: the panel says it cannot reach it, naming the endpoint.
                stop.set()
                for thread in robots:
                    thread.join(timeout=60)
                assert policy.stop() == 0, policy.log()[-3000:]
                expect(page.locator("#capacity-note")).to_contain_text(
                    f"policy unreachable at {config.policy.endpoint}", timeout=30_000)
            finally:
                browser.close()
    finally:
        stop.set()
        policy.stop()
        assert monitor.stop() == 0, monitor.log()[-3000:]
    wait_for(lambda: not any(thread.is_alive() for thread in robots), timeout_s=30)


def test_the_policy_poller_owns_its_client_while_a_ping_hangs(tmp_path: Path) -> None:
    # A policy that takes requests and never answers: the monitor's shutdown (Commands.close, from the main thread)
    # must not close the socket a ping is still waiting on (ZeroMQ sockets are not thread-safe); the poller closes
    # it when it stops.
    import zmq

    from nodes.monitor.__main__ import poll_policy
    from nodes.monitor.commands import Commands
    from nodes.monitor.panel import EventHub, PanelState

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = load_config(write_config(tmp_path, "lift", {"policy": {"endpoint": endpoint},
                                                         "monitor": {"control_timeout_s": 10.0}}))
    context = zmq.Context()
    silent = context.socket(zmq.ROUTER)
    silent.bind(endpoint)
    factory = SocketFactory()
    commands = Commands(config, factory, PanelState(config, EventHub()))
    stop = threading.Event()
    poller = threading.Thread(target=poll_policy, args=(commands.panel, commands, stop), daemon=True)
    try:
        poller.start()
        assert silent.poll(30_000), "the monitor never asked the policy"
        silent.recv_multipart()  # the ping is in flight now, for up to 10 s
        assert commands.policy is not None
        client = commands.policy[1].requests
        sock = client.sock
        commands.close()  # the main thread's shutdown
        assert commands.policy is not None and client.sock is sock and not sock.closed
        stop.set()
        poller.join(timeout=40)  # the ping's attempt, with margin
        assert not poller.is_alive()
        assert commands.policy is None and client.sock is None and sock.closed
    finally:
        stop.set()
        silent.close(linger=0)
        context.term()
        factory.close()

