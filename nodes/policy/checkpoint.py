"""Which checkpoint to load, whether it fits the deployment, and loading it offline.

- A LeRobot ``pretrained_model/`` directory, or a ``lerobot-train`` run folder whose last checkpoint is
  taken (``resolve_checkpoint``); its identity is a hash of the weights (``checkpoint_identity``).
- ``layout_differences`` lists every way the checkpoint's features disagree with the deployment config
  (cameras and their sizes, state/action sizes, joint names, fps); the node refuses to serve on any.
- ``load_lerobot_policy`` loads weights and the pre-/post-processor pipelines (normalisation stats) from
  the directory alone: ImageNet backbone weights are never fetched, the trained ones are in the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import lerobot_pi_sizes
from common.config import DeploymentConfig
from common.layout import ACTION_KEY, IMAGE_KEY_PREFIX, STATE_KEY, Joints, Layout, differences
from common.lerobot_guard import guard_lerobot_imports
from nodes.policy import lerobot_import

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


SIDECAR_NAME = "armpipe.json"  # written by common.tools.checkpoint_maker next to config.json
MODEL_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be served with this deployment; the message says why."""


# ------------------------------------------------------------------------------------------------
# Checkpoint discovery and identity
# ------------------------------------------------------------------------------------------------


def _is_pretrained_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / MODEL_FILE).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """The ``pretrained_model`` directory to load for ``path``.

    ``path`` may be the directory itself, a ``lerobot-train`` output folder (``<run>/checkpoints/...``),
    its ``checkpoints`` folder, or one step folder. ``last`` wins; otherwise the highest numeric step.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"policy.checkpoint: no such file or directory: {path}")
    if _is_pretrained_dir(path):
        return path
    for candidate in (path / "pretrained_model",):
        if _is_pretrained_dir(candidate):
            return candidate
    checkpoints = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    last = checkpoints / "last" / "pretrained_model"
    if _is_pretrained_dir(last):
        return last
    steps = sorted((int(child.name), child) for child in checkpoints.iterdir()
                   if child.is_dir() and re.fullmatch(r"\d+", child.name)
                   and _is_pretrained_dir(child / "pretrained_model"))
    if steps:
        return steps[-1][1] / "pretrained_model"
    raise CheckpointError(f"policy.checkpoint: {path} is neither a LeRobot pretrained_model directory (config.json + "
                          f"{MODEL_FILE}) nor a lerobot-train output folder with checkpoints/<step>/pretrained_model")


def checkpoint_identity(path: Path) -> str:
    """First 16 hex digits of the SHA-256 of the weights file: changes whenever the weights do."""
    digest = hashlib.sha256()
    with (path / MODEL_FILE).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def read_sidecar(path: Path) -> dict[str, Any]:
    sidecar = path / SIDECAR_NAME
    if not sidecar.is_file():
        return {}
    try:
        data = json.loads(sidecar.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{sidecar}: not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


# ------------------------------------------------------------------------------------------------
# Layout check: the checkpoint against the deployment config
# ------------------------------------------------------------------------------------------------


def camera_name(key: str) -> str:
    return key.removeprefix(IMAGE_KEY_PREFIX)


def checkpoint_layout(policy_config: Any, sidecar: dict[str, Any]) -> Layout:
    """The checkpoint as a layout: its image features (C, H, W) and state/action features from the LeRobot
    policy config; joint names and fps from armpipe's sidecar, where the checkpoint has one."""

    def joints(feature: Any, key: str) -> Joints | None:
        if feature is None:
            return None
        return Joints(tuple(feature.shape), list(sidecar[key]) if key in sidecar else None)

    cameras = {camera_name(key): tuple(feature.shape) for key, feature in policy_config.image_features.items()}
    return Layout(cameras=cameras,
                  state=joints(policy_config.robot_state_feature, "state_names"),
                  action=joints(policy_config.action_feature, "action_names"),
                  fps=int(sidecar["fps"]) if "fps" in sidecar else None, channels_first=True)


def layout_differences(policy_config: Any, config: DeploymentConfig, sidecar: dict[str, Any]) -> list[str]:
    """Every way the checkpoint's features disagree with the deployment; empty when it can be served."""
    problems: list[str] = []
    layout = checkpoint_layout(policy_config, sidecar)
    for difference in differences(layout, config):
        name, theirs, ours = difference.name, difference.theirs, difference.ours
        match difference.kind:
            case "extra_camera":
                problems.append(f"checkpoint needs camera '{name}' (image {list(theirs)}), which the config does "
                                f"not have (config cameras: {sorted(config.cameras)})")
            case "missing_camera":
                problems.append(f"config camera '{name}' is not an input of the checkpoint (checkpoint cameras: "
                                f"{sorted(layout.cameras)})")
            case "camera_shape":
                channels, height, width = theirs
                cam = config.cameras[name]
                problems.append(f"camera '{name}': checkpoint expects {height}x{width} images ({channels} "
                                f"channels), config cameras.{name} produces {cam.height}x{cam.width}")
            case "absent" if name == "state":
                problems.append(f"checkpoint has no `{STATE_KEY}` input; the config provides {len(ours)} joints")
            case "absent":
                problems.append(f"checkpoint has no `{ACTION_KEY}` output")
            case "size" if name == "state":
                problems.append(f"state: checkpoint expects {list(theirs)} values, config has {len(ours)} "
                                f"joints ({ours})")
            case "size":
                problems.append(f"action: checkpoint returns {list(theirs)} values, config drives "
                                f"{len(ours)} joints ({ours})")
            case "names":
                key = f"{name}_names"
                problems.append(f"{key}: checkpoint was built for {sidecar[key]}, config has {ours}")
            case "fps" if "fps" in sidecar:  # a checkpoint without armpipe's sidecar states no fps
                problems.append(f"fps: checkpoint was built for {sidecar['fps']} fps, config runs at {config.fps}")
    other = [key for key, feature in policy_config.input_features.items()
             if key != STATE_KEY and key not in policy_config.image_features and feature.type.name != "LANGUAGE"]
    if other:
        problems.append(f"checkpoint needs inputs armpipe does not send: {other}")
    return problems


class StageClock:
    """Seconds spent per named stage of the start-up, in order (the node logs them: where a restart goes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def describe(self) -> str:
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items())


def load_lerobot_policy(path: Path, device: torch.device, clock: StageClock | None = None,
                        vlm_dir: Path | None = None) -> tuple[Any, Any, Any, Any]:
    """(policy config, policy, preprocessor, postprocessor) from a local directory, without the network;
    ``clock`` gets the seconds of each stage (LeRobot import, weights, processors). A language policy's VLM
    config and tokenizer come from ``vlm_dir``, a directory the checkpoint names or the local Hugging Face
    cache (``nodes.policy.vla``); missing ones raise ``LanguageAssetsMissing``."""
    clock = clock or StageClock()
    declared_type = _declared_type(path)
    with clock.stage("lerobot import"):
        guard_lerobot_imports()
        # Only this policy type's modules (seconds less than LeRobot's every-policy import); LeRobot's
        # factory for a type laid out otherwise.
        narrow_class = lerobot_import.policy_class(declared_type) if declared_type in NARROW_TYPES else None
        if narrow_class is None:  # every policy's config registered, as LeRobot's own scripts have it
            lerobot_import.import_all()
            from lerobot.policies.factory import get_policy_class, make_pre_post_processors
        from lerobot.configs.policies import PreTrainedConfig

        # armpipe's small pi0 / pi0.5 sizes (its tiny checkpoints name them), before the config is read; a stock
        # checkpoint loads as LeRobot loads it (common/lerobot_pi_sizes.py).
        lerobot_pi_sizes.register(declared_type)
    try:
        policy_config = PreTrainedConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # draccus / json errors: say which file
        raise CheckpointError(f"{path / 'config.json'}: not a LeRobot policy config ({exc})") from exc
    policy_config.device = device.type
    if hasattr(policy_config, "pretrained_backbone_weights"):
        # The trained weights are in model.safetensors; without this the backbone would be downloaded.
        policy_config.pretrained_backbone_weights = None
    if getattr(policy_config, "compile_model", False):
        policy_config.compile_model = False  # the node compiles (or not) according to policy.compile
    processor_files = ("policy_preprocessor.json", "policy_postprocessor.json")
    missing = [name for name in processor_files if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: missing {missing}; the node needs the processors with the normalisation "
                              "stats (lerobot-train and save_pretrained write them)")
    policy_class = get_policy_class(policy_config.type) if narrow_class is None else narrow_class
    overrides: dict[str, Any] = {"device_processor": {"device": device.type}}
    from nodes.policy.vla import LANGUAGE_TYPES, apply_assets, resolve_language_assets

    language = policy_config.type in LANGUAGE_TYPES
    if language:
        apply_assets(policy_config, resolve_language_assets(policy_config.type, path, policy_config, vlm_dir),
                     overrides)
    try:
        with clock.stage("weights"):
            # Built on the target device: LeRobot builds the model on the CPU and then loads the file over it, so
            # the random initialisation of every parameter (seconds for the 263M-parameter UNet) is wasted work
            # that a GPU does in milliseconds.
            with device:
                policy = policy_class.from_pretrained(path, config=policy_config, local_files_only=True)
            policy.eval()
        with clock.stage("processors"):
            if narrow_class is None:
                preprocessor, postprocessor = make_pre_post_processors(
                    policy_config, pretrained_path=str(path), preprocessor_overrides=overrides)
            else:
                preprocessor, postprocessor = lerobot_import.load_processors(path, overrides)
    except OSError as exc:  # transformers: a VLM config or tokenizer file it could not read (never a download)
        if not language:
            raise
        raise CheckpointError(f"{policy_config.type}: its VLM config or tokenizer could not be loaded from this "
                              f"machine ({exc})") from exc
    return policy_config, policy, preprocessor, postprocessor


# Policy types whose modules load on their own (lerobot.policies.<type>.configuration_/modeling_<type>) and
# whose processors are the saved pipelines with nothing policy-specific to reconnect (LeRobot 0.6.1).
NARROW_TYPES = ("diffusion", "act", "smolvla", "pi0", "pi05")


def keep_unused_transformers_out(checkpoint: str | Path) -> None:
    """For a process that serves one checkpoint (the policy node): when it is a DiffusionPolicy or ACT, keep
    transformers (installed for SmolVLA, pi0 and pi0.5) out of LeRobot's import, which would otherwise load it
    for its tokenizer step whenever it is installed: seconds of every start. Anything else, or a path that does
    not resolve (the load says why), leaves it."""
    try:
        declared = _declared_type(resolve_checkpoint(checkpoint))
    except CheckpointError:
        return
    if declared in ("diffusion", "act"):
        guard_lerobot_imports(needs_transformers=False)


def _declared_type(path: Path) -> str:
    """The ``type`` config.json names ("" if unreadable: the full config parse then says what is wrong)."""
    try:
        declared = json.loads((path / "config.json").read_text()).get("type", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return declared if isinstance(declared, str) else ""
