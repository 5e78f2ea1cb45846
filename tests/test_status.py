"""``make status`` (``common.tools.status``) shows an actuator that refuses to move as plainly as an EXITED
refusal (issue 25, item 2): a real supervisord runs the real actuator, a policy in the test process
(``test_lying_peer.FakePolicy``) first advertises a contract that does not fit the config, then one that does.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import REPO_ROOT, wait_for
from test_lying_peer import FakePolicy, fast_config
from test_monitor import supervisord_factory  # noqa: F401  (fixture)

from common.config import load_config
from common.wire.contract import PolicyContract


def status(config_path: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "common.tools.status", "--config", str(config_path),
                           "--supervisor-url", url], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def actuator_line(result: subprocess.CompletedProcess[str]) -> str:
    return next((line for line in result.stdout.splitlines() if ":actuator " in line), result.stdout)


def test_status_shows_an_actuator_that_refuses_to_move(tmp_path: Path, supervisord_factory: Any) -> None:  # noqa: F811
    config_path = fast_config(tmp_path)
    config = load_config(config_path)
    policy = FakePolicy(config)
    good = policy.contract
    # A 12-joint policy (the sort layout) for this 6-joint arm: the actuator must refuse to move.
    policy.contract = PolicyContract(**{**good.__dict__, "state_names": [f"j{i}" for i in range(12)],
                                        "action_names": [f"j{i}" for i in range(12)]})
    try:
        supervisor = supervisord_factory({"actuator": f"{sys.executable} -m nodes.actuator --config {config_path}"})
        ready = Path(config.run_dir) / "ready" / "actuator.json"
        wait_for(ready.exists, 90, message=f"the actuator never got ready:\n{supervisor.log('actuator')}")

        refused = wait_for(lambda: (r := status(config_path, supervisor.url)) and " RUNNING " in actuator_line(r) and r,
                           30, message="the actuator is not RUNNING under supervisord")
        line = actuator_line(refused)
        assert refused.returncode == 1, refused.stdout  # not everything is up
        assert "RUNNING" in line and "REFUSES" in line, line
        assert "REFUSING: refuses to move" in line and "action: policy returns 12 values" in line, line

        # The right policy comes back (the actuator re-checks every 2 s): status says so, exit 0.
        policy.contract = good
        wait_for(lambda: status(config_path, supervisor.url).returncode == 0, 30,
                 message=f"status never turned good: {status(config_path, supervisor.url).stdout}")
        line = actuator_line(status(config_path, supervisor.url))
        assert "REFUS" not in line and " yes " in line, line
    finally:
        policy.close()
