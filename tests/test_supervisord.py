"""The demo under the real supervisord.conf: comes up ready, actions flow, every node survives restart and
kill -9 with the pipeline resuming by itself, and a node whose peer is missing waits instead of crashing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, free_port, write_config

from bench.harness import ActuatorWatch, Supervised
from common.config import load_config
from common.tools.demo_data import DemoSpec, generate_demo_dataset

# Whole-pipeline tests: supervisord plus six node processes on a 2-core machine take minutes, not seconds.
pytestmark = pytest.mark.timeout(1500)

DEMO_PROGRAMS = ["servo_emulator-main", "dataset_player", "actuator", "recorder", "monitor", "policy"]


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = load_config(REPO_ROOT / "configs" / "lift.yaml")
    root = tmp_path_factory.mktemp("sup-data") / "lift-demo"
    return generate_demo_dataset(config, root, DemoSpec(episodes=2, frames=90), repo_id="armpipe/lift-demo")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint, demo_dataset: Path):
    tmp = tmp_path_factory.mktemp("supervised")
    port = free_port()
    config_path = write_config(tmp, "lift", {
        "player": {"dataset": str(demo_dataset), "loop": True},
        "policy": {"checkpoint": str(tiny_checkpoint("lift", chunk=48)), "timeout_s": 5.0},
        "monitor": {"supervisor_url": f"http://127.0.0.1:{port}/RPC2"},
    })
    stack = Supervised("demo", "lift", config_path, tmp / "run", port).start()
    watch = ActuatorWatch(stack.config.actuator.events_endpoint)
    try:
        yield stack, watch
    finally:
        watch.close()
        stack.shutdown()


def test_demo_comes_up_with_every_program_running_and_ready(demo):
    stack, _ = demo
    stack.wait_all_ready(timeout_s=240)
    procs = {p.name: p for p in stack.processes()}
    assert sorted(procs) == sorted(DEMO_PROGRAMS)
    assert {p.group for p in procs.values()} == {"robot", "server"}
    assert procs["policy"].group == "server"
    status = stack.ctl("status")
    assert "server:policy" in status.stdout and "RUNNING" in status.stdout


def test_actions_flow_from_policy_to_actuator(demo):
    stack, watch = demo
    stack.wait_all_ready(timeout_s=240)
    first = watch.wait_acting(since=0.0, count=10, timeout_s=180)
    assert first > 0
    chunks = [e for e in watch.events if e.meta.get("event") == "chunk"]
    assert chunks, "the actuator published no chunk events"
    assert chunks[-1].arrays["chunk"].shape[1] == 6


def _assert_no_stale_actions(watch: ActuatorWatch, since: float, horizon_s: float) -> None:
    """Every executed (non-hold) action after ``since`` came from an observation at most horizon_s old."""
    for tick in watch.acting_since(since):
        assert tick.t - tick.obs_t <= horizon_s, f"stale action executed: observation {tick.t - tick.obs_t:.2f}s old"


@pytest.mark.parametrize("name", DEMO_PROGRAMS)
def test_node_survives_restart_and_kill9(demo, name):
    stack, watch = demo
    stack.wait_all_ready(timeout_s=240)
    watch.wait_acting(since=time.monotonic(), count=3, timeout_s=120)
    config = stack.config
    # The longest an action may legitimately wait: a whole chunk plus the allowed chunk age.
    horizon_s = 16 / config.fps + config.actuator.max_chunk_age_s + 1.0

    old_pid = stack.process(name).pid
    restart_at = time.monotonic()
    result = stack.ctl("restart", stack.full_name(name))
    assert result.returncode == 0, result.stdout + result.stderr
    stack.wait_ready(name, other_pid=old_pid)
    watch.wait_acting(since=time.monotonic(), count=3, timeout_s=120)
    _assert_no_stale_actions(watch, restart_at, horizon_s)

    killed_pid = stack.kill9(name)
    kill_at = time.monotonic()
    back = stack.wait_ready(name, other_pid=killed_pid)
    assert back.pid != killed_pid
    watch.wait_acting(since=time.monotonic(), count=3, timeout_s=120)
    _assert_no_stale_actions(watch, kill_at, horizon_s)
    if name in ("policy", "dataset_player", "servo_emulator-main"):
        # While a peer of the actuator is gone it holds, with a reason; it never crashes.
        assert stack.process("actuator").state == "RUNNING"


def test_actuator_waits_for_a_missing_policy_instead_of_crashing(demo):
    stack, watch = demo
    stack.wait_all_ready(timeout_s=240)
    actuator_pid = stack.process("actuator").pid
    assert stack.ctl("stop", "server:policy").returncode == 0
    stopped_at = time.monotonic()
    time.sleep(8)
    actuator = stack.process("actuator")
    assert actuator.state == "RUNNING" and actuator.pid == actuator_pid
    held = watch.ticks_since(stopped_at + 3)
    assert held and all(tick.hold for tick in held)
    assert "policy_unreachable" in {tick.hold_reason for tick in held}
    assert stack.ctl("start", "server:policy").returncode == 0
    stack.wait_ready("policy")
    watch.wait_acting(since=time.monotonic(), count=3, timeout_s=120)
