"""Keep an unsupported ``transformers`` away from LeRobot's import (``guard_lerobot_imports``).

Every program that imports LeRobot's policies calls it first: the policy node, the checkpoint maker and
the GPU benchmark.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import sys

log = logging.getLogger(__name__)


# lerobot 0.6.1 pins transformers>=5.4,<5.6 (its `transformers-dep` extra) but imports transformers and peft
# at import time whenever they are installed, whatever their version.
LEROBOT_TRANSFORMERS_PIN = ((5, 4), (5, 6))


def transformers_outside_lerobot_pin(version: str) -> bool:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return True
    low, high = LEROBOT_TRANSFORMERS_PIN
    return not low <= (int(match.group(1)), int(match.group(2))) < high


def guard_lerobot_imports(needs_transformers: bool = True) -> None:
    """Keep an unsupported transformers (and peft, which imports it) away from lerobot's import.

    Call before the first lerobot import. DiffusionPolicy and ACT need neither package; with
    ``sys.modules[name] = None`` lerobot's availability probe (``importlib.util.find_spec``) reports them
    missing and lerobot takes its without-transformers branches. ``needs_transformers=False`` (a process that
    will only ever load one of those: the policy node serving DiffusionPolicy or ACT) hides them whatever their
    version, which saves their import (seconds); SmolVLA, pi0 and pi0.5 need them.
    """
    if "lerobot" in sys.modules:
        return
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return
    if not needs_transformers:
        for name in ("transformers", "peft"):
            sys.modules.setdefault(name, None)  # type: ignore[arg-type]
        log.info("transformers kept out of lerobot's import (this policy does not use it)")
        return
    if transformers_outside_lerobot_pin(version):
        for name in ("transformers", "peft"):
            sys.modules.setdefault(name, None)  # type: ignore[arg-type]
        log.warning("transformers %s is outside lerobot 0.6.1's supported range %s: hidden from lerobot "
                    "(DiffusionPolicy and ACT do not use it)", version, LEROBOT_TRANSFORMERS_PIN)
