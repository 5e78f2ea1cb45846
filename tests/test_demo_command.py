"""``make demo|robot|server|status CONFIG=...`` run a config of one's own, and the messages say which policy
actually runs (its type, trained or not, the checkpoint) instead of "UNTRAINED tiny DiffusionPolicy" always."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from conftest import PYTHON, REPO_ROOT, free_port, wait_for, write_config

from common.config import load_config
from common.tools.demo_data import DemoSpec, generate_demo_dataset
from common.tools.demo_info import describe


def make_dry_run(*args: str) -> str:
    """The commands ``make`` would run (``-n``: none of them runs, setup included)."""
    return subprocess.run(["make", "-n", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                          check=True, timeout=30).stdout


def test_make_targets_take_a_config_of_ones_own(tmp_path: Path) -> None:
    mine = str(tmp_path / "my-sort.yaml")
    assert f"bash .ci/demo lift {mine}" in make_dry_run("demo", f"CONFIG={mine}")
    for role in ("robot", "robot-sim", "server"):
        assert f"bash .ci/supervise {role} lift {mine}" in make_dry_run(role, f"CONFIG={mine}")
    assert f"common.tools.status --config {mine}" in make_dry_run("status", f"CONFIG={mine}")
    assert "common.tools.status --config configs/sort.yaml" in make_dry_run("status", "TASK=sort")
    assert "bash .ci/demo sort" in make_dry_run("demo", "TASK=sort")
    # make status asks supervisord on ARMPIPE_SUPERVISOR_PORT when it is set (.ci/supervise put it there).
    assert "--supervisor-url" not in make_dry_run("status")
    assert "--supervisor-url http://127.0.0.1:9123/RPC2" in make_dry_run("status", "ARMPIPE_SUPERVISOR_PORT=9123")


def test_demo_refuses_a_missing_dataset_or_checkpoint_of_ones_own_naming_the_field(tmp_path: Path) -> None:
    """The demo builds only its own dataset and checkpoint (data/<task>-demo, checkpoints/<task>-tiny); a
    config's own paths that do not exist are refused with exit 2, naming the field, before anything starts."""
    missing_checkpoint = tmp_path / "nowhere" / "pretrained_model"
    config = write_config(tmp_path, "lift", {"policy": {"checkpoint": str(missing_checkpoint)},
                                             "player": {"dataset": str(tmp_path / "no-dataset")}})
    result = subprocess.run(["bash", ".ci/demo", "lift", str(config)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"player.dataset in {config}: no LeRobot v3 dataset at {tmp_path / 'no-dataset'}" in result.stderr

    dataset = generate_demo_dataset(load_config(config), tmp_path / "dataset", DemoSpec(episodes=1, frames=2,
                                                                                        codec="h264"))
    config = write_config(tmp_path, "lift", {"policy": {"checkpoint": str(missing_checkpoint)},
                                             "player": {"dataset": str(dataset)}})
    result = subprocess.run(["bash", ".ci/demo", "lift", str(config)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"policy.checkpoint in {config}: no LeRobot checkpoint at {missing_checkpoint}" in result.stderr
    assert "building a tiny" not in result.stdout


def test_the_message_says_which_policy_runs(tiny_checkpoint: Any, tmp_path: Path) -> None:
    untrained = tiny_checkpoint("lift", "act")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    config = load_config(write_config(tmp_path / "a", "lift", {"policy": {"checkpoint": str(untrained)},
                                                               "run_dir": str(tmp_path / "a" / "run")}))
    line = describe(config)
    assert "policy = act, UNTRAINED" in line and str(untrained) in line and "Diffusion" not in line

    # A checkpoint trained elsewhere (no armpipe.json label): "trained", its type, its path.
    trained = tmp_path / "trained" / "pretrained_model"
    shutil.copytree(untrained, trained)
    (trained / "armpipe.json").unlink()
    config_path = write_config(tmp_path / "b", "lift", {"policy": {"checkpoint": str(trained)},
                                                        "run_dir": str(tmp_path / "b" / "run")})
    config = load_config(config_path)
    line = describe(config)
    assert "policy = act, trained" in line and str(trained) in line and "UNTRAINED" not in line

    # Once the policy node is up, what it reports it loaded (its readiness file) is what the message says.
    ready = tmp_path / "b" / "run" / "ready"
    ready.mkdir(parents=True)
    (ready / "policy.json").write_text(json.dumps({"policy_type": "diffusion", "untrained": True,
                                                   "checkpoint_id": "abc123", "device": "cpu"}))
    line = describe(config)
    assert "policy = diffusion, UNTRAINED" in line and "id abc123" in line and "on cpu" in line

    # On a robot the policy is the server's: the message says where it is served.
    robot = subprocess.run([PYTHON, "-m", "common.tools.demo_info", "describe", "--config",
                            str(config_path), "--role", "robot"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=60)
    assert robot.returncode == 0 and f"policy served at {config.policy.endpoint}" in robot.stdout


def test_demo_waits_for_its_nodes_on_the_supervisor_port_it_was_given(tiny_checkpoint: Any, tmp_path: Path) -> None:
    """``ARMPIPE_SUPERVISOR_PORT=<port> make demo``: supervisord listens there, and the demo's readiness wait asks
    it there (it used to ask monitor.supervisor_url's 9001 and say that nothing was ready)."""
    config = load_config(REPO_ROOT / "configs" / "lift.yaml")
    dataset = generate_demo_dataset(config, tmp_path / "lift-demo", DemoSpec(episodes=1, frames=30, codec="h264"))
    config_path = write_config(tmp_path, "lift", {"player": {"dataset": str(dataset)},
                                                  "policy": {"checkpoint": str(tiny_checkpoint("lift"))}})
    assert load_config(config_path).monitor.supervisor_url == "http://127.0.0.1:9001/RPC2"  # not the port given
    port = free_port()
    env = {**os.environ, "ARMPIPE_RUN": str(tmp_path / "run"), "ARMPIPE_SUPERVISOR_PORT": str(port)}
    panel = f"http://127.0.0.1:{load_config(config_path).monitor.port}/api/state"
    try:
        result = subprocess.run(["bash", ".ci/demo", "lift", str(config_path)], cwd=REPO_ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        # The panel lists the nodes too: its monitor asks the supervisord on that port, not the config's 9001.
        state = wait_for(lambda: (s := json.loads(urllib.request.urlopen(panel, timeout=5).read()))["nodes"]
                         and s["nodes"]["programs"] and s, timeout_s=60, interval_s=0.5,
                         message="the panel lists no supervised nodes")
        assert state["config"]["supervisor_url"] == f"http://127.0.0.1:{port}/RPC2", state["config"]
        assert not state["nodes"]["error"], state["nodes"]
        names = {program["name"] for program in state["nodes"]["programs"]}
        assert {"actuator", "policy", "monitor"} <= names, names
    finally:
        subprocess.run(["bash", ".ci/stop"], cwd=REPO_ROOT, env=env, capture_output=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "not every node is ready yet" not in output and "not reachable" not in output, output
    for program in ("robot:actuator", "server:policy", "robot:monitor"):
        assert re.search(rf"{program}\s+RUNNING\s+yes", output), output
    assert f"ARMPIPE_SUPERVISOR_PORT={port} make status" in output
