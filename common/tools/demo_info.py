"""What a deployment config runs, in words, for ``make demo|robot|server`` (``.ci/demo``, ``.ci/supervise``).

    python -m common.tools.demo_info paths --config configs/lift.yaml      # shell assignments for .ci/demo
    python -m common.tools.demo_info describe --config configs/lift.yaml [--role demo|robot|server]

``paths`` prints the config's task, dataset, checkpoint and panel port as ``KEY=value`` lines (quoted for
the shell), and whether the dataset and checkpoint are the demo's own (``data/<task>-demo``,
``checkpoints/<task>-tiny``), which ``.ci/demo`` builds when they are missing; any other missing path is
the user's and is refused (exit 2) with the field that names it.

``describe`` says which policy runs: its type, whether its weights were trained, and the checkpoint, from
the policy node's readiness file (what it actually loaded) when it is up, else from the checkpoint's
own files (``config.json``'s ``type``, the ``armpipe.json`` that ``common.tools.checkpoint_maker`` writes
beside untrained weights).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from common.config import ConfigError, DeploymentConfig, load_config

log = logging.getLogger("demo_info")

POLICY_PROGRAM = "policy"  # the policy node's readiness file: <run_dir>/ready/policy.json
SIDECAR = "armpipe.json"  # common.tools.checkpoint_maker's label beside untrained weights


def demo_dataset(config: DeploymentConfig) -> Path:
    return config.resolve(f"data/{config.task}-demo")


def demo_checkpoint(config: DeploymentConfig) -> Path:
    return config.resolve(f"checkpoints/{config.task}-tiny/pretrained_model")


def paths(config: DeploymentConfig) -> dict[str, str]:
    dataset = config.resolve(config.player.dataset)
    checkpoint = config.resolve(config.policy.checkpoint)
    return {
        "task": config.task, "dataset": str(dataset), "checkpoint": str(checkpoint),
        "dataset_is_demo": "1" if dataset.resolve() == demo_dataset(config).resolve() else "",
        "checkpoint_is_demo": "1" if checkpoint.resolve() == demo_checkpoint(config).resolve() else "",
        "port": str(config.monitor.port), "policy_endpoint": config.policy.endpoint,
    }


def checkpoint_facts(checkpoint: Path) -> dict[str, Any]:
    """The policy type and whether the weights are untrained, from the checkpoint's own files."""
    facts: dict[str, Any] = {"policy_type": "", "untrained": None}
    try:
        facts["policy_type"] = str(json.loads((checkpoint / "config.json").read_text()).get("type", ""))
    except (OSError, ValueError, AttributeError):
        return facts  # no checkpoint there (yet): neither trained nor untrained
    sidecar = checkpoint / SIDECAR
    facts["untrained"] = False  # no label: weights trained elsewhere (lerobot-train writes none)
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if sidecar.exists():
            facts["untrained"] = bool(json.loads(sidecar.read_text()).get("untrained", False))
    return facts


def served(config: DeploymentConfig) -> dict[str, Any] | None:
    """What the local policy node reports it loaded (its readiness file), or None when it is not up."""
    path = config.resolve(config.run_dir) / "ready" / f"{POLICY_PROGRAM}.json"
    try:
        ready = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return ready if isinstance(ready, dict) else None


def describe(config: DeploymentConfig, role: str = "demo") -> str:
    """One line: which policy runs (or, on a robot, where it is served), trained or not, from which checkpoint."""
    checkpoint = config.resolve(config.policy.checkpoint)
    if role in ("robot", "robot-sim"):
        return (f"policy served at {config.policy.endpoint} (the GPU server's policy.checkpoint; the actuator "
                f"checks its contract and shows it on the panel)")
    facts = checkpoint_facts(checkpoint)
    ready = served(config) if role in ("demo", "server") else None
    source = "as loaded by the policy node"
    if ready is not None and ready.get("policy_type"):
        facts = {"policy_type": ready.get("policy_type"), "untrained": bool(ready.get("untrained")),
                 "checkpoint_id": ready.get("checkpoint_id", ""), "device": ready.get("device", "")}
    else:
        source = "from its files; the policy node is not ready yet"
    kind = facts.get("policy_type") or "unknown policy type"
    if facts.get("untrained") is None:
        return f"policy = none yet: no LeRobot checkpoint at {checkpoint} (policy.checkpoint)"
    trained = "UNTRAINED (random weights: a plumbing demo, not a skill)" if facts["untrained"] else "trained"
    where = f" on {facts['device']}" if facts.get("device") else ""
    ident = f", id {facts['checkpoint_id']}" if facts.get("checkpoint_id") else ""
    return f"policy = {kind}, {trained}{where}: checkpoint {checkpoint}{ident} ({source})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["paths", "describe"])
    parser.add_argument("--config", required=True, help="deployment YAML, e.g. configs/lift.yaml")
    parser.add_argument("--role", default="demo", choices=["demo", "robot", "robot-sim", "server"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s demo_info: %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    if args.what == "paths":
        for key, value in paths(config).items():
            sys.stdout.write(f"{key}={shlex.quote(value)}\n")
    else:
        sys.stdout.write(describe(config, args.role) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
