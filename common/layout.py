"""The LeRobot dataset features of a deployment: one video per configured camera, the state and the action,
in the form ``lerobot.utils.feature_utils.hw_to_dataset_features`` gives (dtype, shape, names), built here
without importing LeRobot (its configs import torch, which a robot-side node never loads).

Used by the demo-data tool (the datasets it generates) and the recorder (the episodes it writes), so a
generated dataset and a recorded one always have the same layout.
"""

from __future__ import annotations

from common.config import DeploymentConfig
from common.wire.contract import ACTION_KEY, STATE_KEY, image_key

IMAGE_NAMES = ["height", "width", "channels"]


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
