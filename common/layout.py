"""The LeRobot layout of a deployment: its feature keys, its dataset features, and how another side's layout
(a policy's contract, a checkpoint, a dataset) differs from it.

- ``dataset_features``: one video per configured camera, the state and the action, in the form
  ``lerobot.utils.feature_utils.hw_to_dataset_features`` gives (dtype, shape, names), built here without
  importing LeRobot (its configs import torch, which a robot-side node never loads). Used by the demo-data
  tool (the datasets it generates) and the recorder (the episodes it writes), so a generated dataset and a
  recorded one always have the same layout.
- ``differences``: the one comparison of cameras, image shapes, state and action sizes and names, and fps
  behind the actuator's contract check (``common.wire.contract.contract_differences``), the policy node's
  checkpoint check (``nodes.policy.checkpoint.layout_differences``) and the player's dataset check
  (``common.dataset_source.layout_differences``). Each of those turns its side into a ``Layout``, picks the
  differences that matter to it and words them in its own terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from common.config import DeploymentConfig

# LeRobot's feature keys; on the wire they are also the array names of an observation (docs/protocol.md).
IMAGE_KEY_PREFIX = "observation.images."
STATE_KEY = "observation.state"
ACTION_KEY = "action"
IMAGE_NAMES = ["height", "width", "channels"]


def image_key(camera: str) -> str:
    """The LeRobot feature key (and wire array name) of a camera's image."""
    return f"{IMAGE_KEY_PREFIX}{camera}"


def dataset_features(config: DeploymentConfig, image_size: tuple[int, int] | None = None) -> dict[str, dict]:
    """Each camera at its configured size (or ``image_size`` = (height, width) for all), state and action."""
    features: dict[str, dict] = {
        image_key(name): {"dtype": "video", "shape": (*(image_size or (cam.height, cam.width)), 3),
                          "names": list(IMAGE_NAMES)}
        for name, cam in config.cameras.items()
    }
    state, action = config.state_names(), list(config.action_names())
    features[STATE_KEY] = {"dtype": "float32", "shape": (len(state),), "names": state}
    features[ACTION_KEY] = {"dtype": "float32", "shape": (len(action),), "names": action}
    return features


# ------------------------------------------------------------------ comparing another side with the config


@dataclass(frozen=True)
class Joints:
    """A state or action vector as the other side describes it."""

    shape: tuple[Any, ...]  # (n,) for a vector of n joints; whatever that side says otherwise
    names: list[str] | None = None  # None: that side does not name its joints (nothing to compare)


@dataclass(frozen=True)
class Layout:
    """What the other side takes or holds, as it states it."""

    cameras: dict[str, tuple[Any, ...]]  # camera name -> image shape: (H, W, C), or (C, H, W) if channels_first
    state: Joints | None  # None: that side has no state
    action: Joints | None  # None: that side has no action
    fps: int | None  # None: that side does not say (it then differs; the caller decides whether that matters)
    channels_first: bool = False  # a LeRobot policy config's image features are (C, H, W)


DifferenceKind = Literal[
    "extra_camera",  # a camera that side has and the config does not
    "missing_camera",  # a config camera that side lacks
    "camera_shape",  # a camera both have, at different image shapes
    "absent",  # that side has no state (or action) at all
    "size",  # the state (or action) has another shape than the config's joints
    "names",  # same size, other joint names (or order)
    "fps",
]


@dataclass(frozen=True)
class Difference:
    kind: DifferenceKind
    name: str  # the camera, or "state" / "action", or "fps"
    theirs: Any  # that side's value: image shape, vector shape, joint names or fps (None where it has none)
    ours: Any  # the config's: image shape (in that side's order), joint names, fps (None where it has none)


def differences(theirs: Layout, config: DeploymentConfig) -> list[Difference]:
    """Every way ``theirs`` disagrees with the config, in one order: cameras only that side has, cameras only
    the config has, image shapes, the state, the action, fps (camera names sorted within each group).

    Joint names are compared only where the sizes agree (names of another length are already a size
    difference) and only where that side names its joints.
    """
    ours_cameras = {name: (3, cam.height, cam.width) if theirs.channels_first else (cam.height, cam.width, 3)
                    for name, cam in config.cameras.items()}
    found: list[Difference] = []
    for name in sorted(set(theirs.cameras) - set(ours_cameras)):
        found.append(Difference("extra_camera", name, theirs.cameras[name], None))
    for name in sorted(set(ours_cameras) - set(theirs.cameras)):
        found.append(Difference("missing_camera", name, None, ours_cameras[name]))
    for name in sorted(set(ours_cameras) & set(theirs.cameras)):
        if tuple(theirs.cameras[name]) != ours_cameras[name]:
            found.append(Difference("camera_shape", name, theirs.cameras[name], ours_cameras[name]))
    for label, joints, names in (("state", theirs.state, config.state_names()),
                                 ("action", theirs.action, config.action_names())):
        if joints is None:
            found.append(Difference("absent", label, None, names))
        elif tuple(joints.shape) != (len(names),):
            found.append(Difference("size", label, joints.shape, names))
        elif joints.names is not None and list(joints.names) != names:
            found.append(Difference("names", label, joints.names, names))
    if theirs.fps != config.fps:
        found.append(Difference("fps", "fps", theirs.fps, config.fps))
    return found
