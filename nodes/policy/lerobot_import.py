"""Import one LeRobot policy type without importing all of them: a faster start of the policy node.

Why this exists: ``lerobot/policies/__init__.py`` (LeRobot 0.6.1) imports the configuration of every policy
LeRobot ships (about twenty: pi0, GR00T, FastWAM with diffusers' VAE models, ...) and ``lerobot.policies.factory``
adds more. Python runs a package's ``__init__`` before any of its submodules, so loading a DiffusionPolicy
paid for all of them: 8-9 s of a 12 s checkpoint load on the GPU machine, 2-3 s on a 2-core VM.

What it does: ``policy_class(type)`` registers a lazy stand-in for the package ``lerobot.policies`` (its
real ``__path__``, so every submodule imports as usual) and imports only ``lerobot.policies.<type>``: its
configuration (registered with LeRobot's config registry, as the full import does), its policy class and
its processor steps. The first lookup of a name the stand-in does not have (``lerobot.policies.ACTConfig``,
``from lerobot.policies import ...`` anywhere) runs the real ``__init__`` in the same module object, so
code that needs the whole package still gets it, one import later. A policy type without the usual
``configuration_<type>`` / ``modeling_<type>`` modules is left to LeRobot's factory (``None``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
import threading
import types
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PACKAGE = "lerobot.policies"


class LazyPoliciesPackage(types.ModuleType):
    """``lerobot.policies`` with its submodules importable and its ``__init__`` run on first need."""

    _lock = threading.Lock()

    def __init__(self, init_file: Path) -> None:
        super().__init__(PACKAGE)
        self.__file__ = str(init_file)
        self.__path__ = [str(init_file.parent)]
        self.__package__ = PACKAGE
        self.__dict__["_init_file"] = init_file
        self.__dict__["_initialised"] = False

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or self.__dict__["_initialised"]:
            raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")
        self.run_real_init()
        return super().__getattribute__(name)

    def run_real_init(self) -> None:
        with self._lock:
            if self.__dict__["_initialised"]:
                return
            self.__dict__["_initialised"] = True
            spec = importlib.util.spec_from_file_location(PACKAGE, self.__dict__["_init_file"],
                                                          submodule_search_locations=self.__path__)
            assert spec is not None and spec.loader is not None
            spec.loader.exec_module(self)  # the real __init__, in this module's namespace


def install() -> None:
    """Put the stand-in in place, unless ``lerobot.policies`` is imported already (then nothing to save)."""
    if PACKAGE in sys.modules:
        return
    import lerobot  # the top package is light; only its policies package is not

    init_file = Path(lerobot.__file__).parent / "policies" / "__init__.py"
    stand_in = LazyPoliciesPackage(init_file)
    sys.modules[PACKAGE] = stand_in
    lerobot.policies = stand_in  # type: ignore[attr-defined]


def import_all() -> types.ModuleType:
    """The whole ``lerobot.policies`` package, as a plain ``import lerobot.policies`` gives it."""
    install()
    package = sys.modules[PACKAGE]
    if isinstance(package, LazyPoliciesPackage):
        package.run_real_init()
    return package


def policy_class(policy_type: str) -> type | None:
    """The policy class of ``policy_type`` (e.g. "diffusion", "act"), importing only that policy's package
    (its configuration module registers the config with LeRobot's registry); ``None`` where LeRobot's
    factory has to find it."""
    install()
    package = f"{PACKAGE}.{policy_type}"
    try:
        importlib.import_module(f"{package}.configuration_{policy_type}")
        modeling = importlib.import_module(f"{package}.modeling_{policy_type}")
        importlib.import_module(package)  # its __init__: the processor steps it registers, if any
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith(package):
            raise  # a dependency of that policy is missing: LeRobot's factory would fail the same way
        return None
    from lerobot.policies.pretrained import PreTrainedPolicy

    policies = [cls for _, cls in inspect.getmembers(modeling, inspect.isclass)
                if issubclass(cls, PreTrainedPolicy) and cls.__module__ == modeling.__name__
                and getattr(cls, "name", None) == policy_type]
    if len(policies) != 1:
        log.info("lerobot.policies.%s: no single policy class found; using LeRobot's factory", policy_type)
        return None
    return policies[0]


def load_processors(path: Path, preprocessor_overrides: dict[str, Any]) -> tuple[Any, Any]:
    """The checkpoint's saved pre-/post-processor pipelines: the ``pretrained_path`` branch of LeRobot 0.6.1's
    ``make_pre_post_processors`` for the policies without their own loader (all but GR00T and EO-1),
    without importing ``lerobot.policies.factory`` (which imports every environment and two more policies)."""
    from lerobot.processor import (
        AbsoluteActionsProcessorStep,
        PolicyProcessorPipeline,
        RelativeActionsProcessorStep,
        batch_to_transition,
        policy_action_to_transition,
        transition_to_batch,
        transition_to_policy_action,
    )
    from lerobot.utils.constants import POLICY_POSTPROCESSOR_DEFAULT_NAME, POLICY_PREPROCESSOR_DEFAULT_NAME

    preprocessor = PolicyProcessorPipeline.from_pretrained(
        pretrained_model_name_or_path=str(path), config_filename=f"{POLICY_PREPROCESSOR_DEFAULT_NAME}.json",
        overrides=preprocessor_overrides, to_transition=batch_to_transition, to_output=transition_to_batch)
    postprocessor = PolicyProcessorPipeline.from_pretrained(
        pretrained_model_name_or_path=str(path), config_filename=f"{POLICY_POSTPROCESSOR_DEFAULT_NAME}.json",
        overrides={}, to_transition=policy_action_to_transition, to_output=transition_to_policy_action)
    # As LeRobot does after loading: a relative-actions pair shares its cached state (not serialisable).
    relative = next((step for step in preprocessor.steps if isinstance(step, RelativeActionsProcessorStep)), None)
    if relative is not None:
        for step in postprocessor.steps:
            if isinstance(step, AbsoluteActionsProcessorStep) and step.relative_step is None:
                step.relative_step = relative
    return preprocessor, postprocessor
