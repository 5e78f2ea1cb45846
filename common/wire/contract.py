"""The policy's contract: what it accepts and returns, checked by the actuator before it moves."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from common.config import DeploymentConfig

IMAGE_KEY_PREFIX = "observation.images."
STATE_KEY = "observation.state"
ACTION_KEY = "action"
# Real-time chunking (overlap: rtc) on an infer request: the rows the new chunk must continue, and how many
# of them are frozen (docs/protocol.md, policy node requests).
RTC_PREFIX_KEY = "rtc_prefix"
RTC_DELAY_KEY = "rtc_delay_rows"


def image_key(camera: str) -> str:
    """The LeRobot feature key (and wire array name) of a camera's image."""
    return f"{IMAGE_KEY_PREFIX}{camera}"


@dataclass
class PolicyContract:
    policy_type: str
    cameras: dict[str, list[int]]  # camera name -> accepted image shape [H, W, 3], uint8 RGB
    state_names: list[str]
    action_names: list[str]
    chunk_length: int  # rows per reply
    n_obs_steps: int  # observations of history the policy uses (DiffusionPolicy > 1)
    fps: int
    checkpoint_id: str  # content hash of model.safetensors (first 16 hex digits of SHA-256)
    checkpoint_path: str = ""
    untrained: bool = False  # weights never trained: shown wherever the policy is named
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> PolicyContract:
        known = {key: meta[key] for key in cls.__dataclass_fields__ if key in meta}
        return cls(**known)


def contract_differences(contract: PolicyContract, config: DeploymentConfig) -> list[str]:
    """Every way the policy's contract disagrees with this deployment; empty when they agree."""
    problems: list[str] = []
    wanted_cameras = config.image_shapes()
    for name in sorted(set(contract.cameras) - set(wanted_cameras)):
        problems.append(f"policy needs camera '{name}' {contract.cameras[name]}, which the config "
                        f"does not have (config cameras: {sorted(wanted_cameras)})")
    for name in sorted(set(wanted_cameras) & set(contract.cameras)):
        if list(contract.cameras[name]) != list(wanted_cameras[name]):
            problems.append(f"camera '{name}': policy accepts {contract.cameras[name]}, config "
                            f"produces {wanted_cameras[name]}")
    state_names = config.state_names()
    if len(contract.state_names) != len(state_names):
        problems.append(f"state: policy expects {len(contract.state_names)} values, config has "
                        f"{len(state_names)} ({state_names})")
    elif list(contract.state_names) != state_names:
        problems.append(f"state names differ: policy {contract.state_names}, config {state_names}")
    action_names = config.action_names()
    if len(contract.action_names) != len(action_names):
        problems.append(f"action: policy returns {len(contract.action_names)} values, config drives "
                        f"{len(action_names)} joints ({action_names})")
    elif list(contract.action_names) != action_names:
        problems.append(f"action names differ: policy {contract.action_names}, config {action_names}")
    if contract.fps != config.fps:
        problems.append(f"fps: policy was set up for {contract.fps}, config runs at {config.fps}")
    if contract.chunk_length < 1:
        problems.append(f"chunk_length: policy returns {contract.chunk_length} rows")
    return problems
