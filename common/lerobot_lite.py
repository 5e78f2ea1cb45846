"""Import LeRobot's hardware modules (Feetech motors, cameras) without loading torch.

Why this exists: ``lerobot/utils/__init__.py`` (LeRobot 0.6.1) re-exports three torch-device helpers
from ``lerobot.utils.device_utils``, whose first statement is ``import torch``. Python runs a package's
``__init__`` before any of its submodules, so every ``lerobot.utils.*`` import - ``constants``,
``import_utils``, ``decorators``, which ``lerobot.motors`` and ``lerobot.cameras`` need - loads torch
(seconds of start-up and hundreds of MB on a robot computer that never runs a network).

What it does, and nothing more: ``install()`` registers a stand-in module under the name
``lerobot.utils.device_utils`` before ``lerobot.utils`` is first imported. The stand-in defines the
three names ``lerobot.utils`` re-exports, as forwarders; the first call of one, or the first lookup of
any other name in the module (only torch-using code does either), imports the real
``lerobot.utils.device_utils`` in its place and uses it. So a process that does need torch later still
gets LeRobot's real functions; a robot-side node simply never pays for them.

Call ``install()`` before the first ``lerobot`` import of a module (``common.feetech_bus`` and the camera
backends do). It does nothing when ``lerobot.utils`` is already imported (torch is then loaded anyway).
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

DEVICE_UTILS = "lerobot.utils.device_utils"
# What lerobot/utils/__init__.py imports from device_utils (LeRobot 0.6.1).
REEXPORTED = ("auto_select_torch_device", "get_safe_torch_device", "is_torch_device_available")


class StandIn(types.ModuleType):
    """Marks the torch-free stand-in (``isinstance(sys.modules[DEVICE_UTILS], StandIn)`` while unused)."""


_swap_lock = threading.Lock()  # two threads asking at once must not see a half-imported real module


def real_device_utils() -> types.ModuleType:
    """LeRobot's real ``lerobot.utils.device_utils`` (imports torch), replacing the stand-in everywhere."""
    with _swap_lock:
        module = sys.modules.get(DEVICE_UTILS)
        if module is not None and not isinstance(module, StandIn):
            return module
        sys.modules.pop(DEVICE_UTILS, None)
        return importlib.import_module(DEVICE_UTILS)  # also rebinds lerobot.utils.device_utils


def _forwarder(name: str) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return getattr(real_device_utils(), name)(*args, **kwargs)

    forward.__name__ = forward.__qualname__ = name
    forward.__doc__ = f"Loads torch and calls lerobot.utils.device_utils.{name}."
    return forward


def _module_getattr(name: str) -> Any:
    # Dunder probes (the import system asks for __path__, inspect for __wrapped__, ...) must not load
    # torch; a real name means torch-using code is here, so it gets the real module.
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    return getattr(real_device_utils(), name)


def install() -> bool:
    """Register the stand-in; True if it is (now or already) in place, False if too late or not needed."""
    if DEVICE_UTILS in sys.modules:
        return isinstance(sys.modules[DEVICE_UTILS], StandIn)
    if "lerobot.utils" in sys.modules:
        return False
    stand_in = StandIn(DEVICE_UTILS, "torch-free stand-in for lerobot.utils.device_utils (common.lerobot_lite)")
    for name in REEXPORTED:
        setattr(stand_in, name, _forwarder(name))
    stand_in.__getattr__ = _module_getattr  # PEP 562: a module-level __getattr__ for names it lacks
    sys.modules[DEVICE_UTILS] = stand_in
    return True
