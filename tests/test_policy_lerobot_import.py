"""The policy node loads one LeRobot policy type without importing every policy LeRobot ships
(``nodes.policy.lerobot_import``), and gets the same policy and processors as LeRobot's factory does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from nodes.policy.checkpoint import load_lerobot_policy

REPO_ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: this test process has imported all of lerobot.policies already.
LOAD_ALONE = """
import json, sys, torch
from pathlib import Path
from nodes.policy.checkpoint import load_lerobot_policy, StageClock
clock = StageClock()
config, policy, pre, post = load_lerobot_policy(Path(sys.argv[1]), torch.device("cpu"), clock)
loaded = sorted(name for name in sys.modules if name.startswith("lerobot.policies."))
state = {key: float(value.double().sum()) for key, value in policy.state_dict().items()}
report = {"policy": type(policy).__name__, "steps": [type(s).__name__ for s in pre.steps],
          "post_steps": [type(s).__name__ for s in post.steps], "state": state, "loaded": loaded,
          "factory": "lerobot.policies.factory" in sys.modules, "stages": list(clock.seconds)}
import lerobot.policies
report["lazy_name"] = lerobot.policies.ACTConfig.__name__  # the whole package, on first need
report["groot_after"] = "lerobot.policies.groot" in sys.modules
print(json.dumps(report))
"""


def load_in_fresh_process(checkpoint: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", LOAD_ALONE, str(checkpoint)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("task,policy_type", [("lift", "diffusion"), ("sort", "act")])
def test_one_policy_type_loads_alone_and_equals_the_factory(task: str, policy_type: str, tiny_checkpoint) -> None:
    checkpoint = tiny_checkpoint(task, policy_type)
    alone = load_in_fresh_process(checkpoint)
    own_package = f"lerobot.policies.{policy_type}"
    others = [name for name in alone["loaded"] if name.split(".")[2] not in (policy_type, "pretrained", "utils")]
    assert others == [], f"other policies imported: {others}"
    assert not alone["factory"]
    assert any(name.startswith(own_package) for name in alone["loaded"])
    assert alone["stages"][0] == "lerobot import" and "lerobot factory import" not in alone["stages"]
    # The rest of the package is still there when asked for.
    assert alone["lazy_name"] == "ACTConfig" and alone["groot_after"] is True

    # The same checkpoint through LeRobot's own factory: same class, same weights, same processor pipelines.
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    policy_config, _, _, _ = load_lerobot_policy(checkpoint, torch.device("cpu"))
    policy = get_policy_class(policy_config.type).from_pretrained(checkpoint, config=policy_config,
                                                                  local_files_only=True)
    pre, post = make_pre_post_processors(policy_config, pretrained_path=str(checkpoint),
                                         preprocessor_overrides={"device_processor": {"device": "cpu"}})
    assert alone["policy"] == type(policy).__name__
    assert alone["steps"] == [type(step).__name__ for step in pre.steps]
    assert alone["post_steps"] == [type(step).__name__ for step in post.steps]
    factory_state = {key: float(value.double().sum()) for key, value in policy.state_dict().items()}
    assert alone["state"].keys() == factory_state.keys()
    for key, total in factory_state.items():
        assert alone["state"][key] == pytest.approx(total, rel=1e-9, abs=1e-9), key
