"""The policy's contract: what it accepts and returns, checked by the actuator before it moves."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from common.config import DeploymentConfig, resolve_repo_path

# The wire's array names are LeRobot's feature keys (common.layout); re-exported for the nodes and clients.
from common.layout import ACTION_KEY as ACTION_KEY
from common.layout import IMAGE_KEY_PREFIX as IMAGE_KEY_PREFIX
from common.layout import STATE_KEY as STATE_KEY
from common.layout import Joints, Layout, differences
from common.layout import image_key as image_key

# Real-time chunking (overlap: rtc) on an infer request: the rows the new chunk must continue, and how many
# of them are frozen (docs/protocol.md, policy node requests).
RTC_PREFIX_KEY = "rtc_prefix"
RTC_DELAY_KEY = "rtc_delay_rows"
# ... and on its reply: the rows the policy predicted after the chunk (never executed), which an rtc client
# sends back as soft prefix rows with its next request.
RTC_GUIDE_KEY = "rtc_guide"


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
    # The checkpoint's dataset statistics (its normaliser's), robot units: {"observation.state" | "action":
    # {"min" | "max" | "mean": [one value per name]}}; empty when the checkpoint has none.
    stats: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # A language policy (SmolVLA, pi0, pi0.5): every infer request must carry meta.instruction. False from
    # servers older than the field.
    takes_instruction: bool = False

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> PolicyContract:
        known = {key: meta[key] for key in cls.__dataclass_fields__ if key in meta}
        return cls(**known)


def contract_layout(contract: PolicyContract) -> Layout:
    """The contract as a layout: image shapes (H, W, 3), the joints it reads and returns, its fps."""
    return Layout(cameras={name: tuple(shape) for name, shape in contract.cameras.items()},
                  state=Joints((len(contract.state_names),), list(contract.state_names)),
                  action=Joints((len(contract.action_names),), list(contract.action_names)), fps=contract.fps)


def contract_differences(contract: PolicyContract, config: DeploymentConfig) -> list[str]:
    """Every way the policy's contract disagrees with this deployment; empty when they agree.

    A config camera the policy does not read is no problem (the policy ignores that view).
    """
    problems: list[str] = []
    for difference in differences(contract_layout(contract), config):
        name, ours = difference.name, difference.ours
        match difference.kind:
            case "extra_camera":
                problems.append(f"policy needs camera '{name}' {contract.cameras[name]}, which the config "
                                f"does not have (config cameras: {sorted(config.cameras)})")
            case "camera_shape":
                problems.append(f"camera '{name}': policy accepts {contract.cameras[name]}, config "
                                f"produces {list(ours)}")
            case "size" if name == "state":
                problems.append(f"state: policy expects {len(contract.state_names)} values, config has "
                                f"{len(ours)} ({ours})")
            case "names" if name == "state":
                problems.append(f"state names differ: policy {contract.state_names}, config {ours}")
            case "size":
                problems.append(f"action: policy returns {len(contract.action_names)} values, config drives "
                                f"{len(ours)} joints ({ours})")
            case "names":
                problems.append(f"action names differ: policy {contract.action_names}, config {ours}")
            case "fps":
                problems.append(f"fps: policy was set up for {contract.fps}, config runs at {config.fps}")
    # What a client found when it built the contract itself (policy.backend openpi: nodes.actuator.openpi_client).
    problems += [str(problem) for problem in contract.extra.get("problems", []) or []]
    if contract.chunk_length < 1 and not contract.extra.get("problems"):
        problems.append(f"chunk_length: policy returns {contract.chunk_length} rows")
    if config.actuator.overlap == "rtc" and not int(contract.extra.get("rtc_max_prefix_rows", 0) or 0):
        problems.append(f"actuator.overlap: rtc needs a policy that continues a prefix (DiffusionPolicy with its "
                        f"DDIM/DDPM sampler mirrored, or SmolVLA / pi0 / pi0.5 through LeRobot's real-time chunking); "
                        f"this {contract.policy_type} policy cannot: use replace or blend")
    return problems


# ------------------------------------------------------------------ units and ranges
STAT_KINDS = ("min", "max", "mean")
RANGE_MODE_BOUND = 100.0  # LeRobot's RANGE_M100_100 norm mode maps the calibrated range onto -100..100
RANGE_MODE_SLACK = 0.5  # stats computed from float32 data may overshoot the bound by rounding
RANGE_MODE_SATURATION = 97.0  # a body joint that reached its calibrated end shows up at +-97..100 there
LIMIT_SLACK = 1.0  # robot units a dataset's min/max may lie beyond a configured joint limit


def _joint_stats(contract: PolicyContract, key: str, size: int) -> dict[str, list[float]] | None:
    stats = contract.stats.get(key) if isinstance(contract.stats, dict) else None
    if not isinstance(stats, dict):
        return None
    values: dict[str, list[float]] = {}
    for kind in STAT_KINDS:
        column = stats.get(kind)
        if not isinstance(column, list) or len(column) != size:
            return None
        try:
            values[kind] = [float(v) for v in column]
        except (TypeError, ValueError):
            return None
        if not all(math.isfinite(v) for v in values[kind]):
            return None
    return values


def dataset_units(names: list[str], stats: dict[str, list[float]]) -> str:
    """Which units a dataset's body joints (everything but the gripper) were recorded in, from its stats:

    ``"range"`` when every body joint lies within -100..100 and at least one reaches +-97 or beyond (LeRobot's
    -100..100 range mode saturates at the calibrated ends), ``"degrees"`` when some body joint goes past
    +-100, ``""`` when the stats cannot tell (every joint inside +-97: both readings are possible).
    """
    body = [i for i, name in enumerate(names) if not name.removesuffix(".pos").endswith("gripper")]
    if not body:
        return ""
    low = [stats["min"][i] for i in body]
    high = [stats["max"][i] for i in body]
    bound = RANGE_MODE_BOUND + RANGE_MODE_SLACK
    if any(v < -bound for v in low) or any(v > bound for v in high):
        return "degrees"
    if any(v <= -RANGE_MODE_SATURATION for v in low) or any(v >= RANGE_MODE_SATURATION for v in high):
        return "range"
    return ""


def units_differences(contract: PolicyContract, config: DeploymentConfig) -> list[str]:
    """Every way the checkpoint's dataset statistics disagree with the arms' units and joint limits.

    Two checks per stats key (``observation.state``, ``action``): the dataset's units against each arm's
    ``use_degrees`` (degrees, or LeRobot's -100..100 range mode), and each joint's dataset min/max against
    its configured limits. Each problem names the joint and both ranges. Empty when the checkpoint carries
    no stats (nothing to compare) or everything agrees.
    """
    problems: list[str] = []
    wrong_units: dict[str, str] = {}  # arm -> the units its checkpoint's dataset looks like
    lower, upper = config.lower_limits(), config.upper_limits()
    for key, names in ((STATE_KEY, config.state_names()), (ACTION_KEY, config.action_names())):
        stats = _joint_stats(contract, key, len(names))
        if stats is None:
            continue
        offset = 0
        for arm_name, arm in config.arms.items():
            joints = arm.joint_names()
            part = {kind: column[offset:offset + len(joints)] for kind, column in stats.items()}
            units = dataset_units(joints, part)
            configured = "degrees" if arm.use_degrees else "range"
            if units and units != configured:
                body = [i for i, name in enumerate(joints) if not name.endswith("gripper.pos")]
                if units == "range":
                    telling = [i for i in body if part["min"][i] <= -RANGE_MODE_SATURATION
                               or part["max"][i] >= RANGE_MODE_SATURATION]
                    why = "every body joint within -100..100, saturated at the ends: LeRobot's -100..100 range mode"
                else:
                    telling = [i for i in body if part["min"][i] < -RANGE_MODE_BOUND - RANGE_MODE_SLACK
                               or part["max"][i] > RANGE_MODE_BOUND + RANGE_MODE_SLACK]
                    why = "beyond +-100: degrees"
                if telling:
                    wrong_units[arm_name] = units
                for i in telling:
                    j = offset + i
                    problems.append(
                        f"units: {joints[i]} ({key}): the checkpoint's dataset range {part['min'][i]:.1f}.."
                        f"{part['max'][i]:.1f} (mean {part['mean'][i]:.1f}) looks like {why}; arm '{arm_name}' is "
                        f"configured in {'degrees' if arm.use_degrees else '-100..100 range mode'} "
                        f"(arms.{arm_name}.use_degrees: {str(arm.use_degrees).lower()}, limits "
                        f"{lower[j]:g}..{upper[j]:g})")
            offset += len(joints)
        for j, name in enumerate(names):
            low, high = stats["min"][j], stats["max"][j]
            if low < lower[j] - LIMIT_SLACK or high > upper[j] + LIMIT_SLACK:
                problems.append(f"range: {name} ({key}): the checkpoint's dataset range {low:.1f}..{high:.1f} "
                                f"(mean {stats['mean'][j]:.1f}) lies outside the configured limits "
                                f"{lower[j]:g}..{upper[j]:g}")
    if problems:
        problems.append(units_fix(config, wrong_units))
    return problems


def units_fix(config: DeploymentConfig, wrong_units: dict[str, str]) -> str:
    """The last line of a units refusal: what to change in the config, field by field."""
    steps = []
    variant = f"configs/{config.task}-range.yaml"
    example = (f"{variant} is the {config.task} layout so" if resolve_repo_path(variant).is_file()
               else 'docs/configuration.md, "Units", converts them')
    for arm_name, units in wrong_units.items():
        if units == "range":
            steps.append(f"set arms.{arm_name}.use_degrees: false and give its lower_limits, upper_limits, max_step "
                         f"and rest_pose in -100..100 range units ({example})")
        else:
            steps.append(f"set arms.{arm_name}.use_degrees: true and give its lower_limits, upper_limits, max_step "
                         f"and rest_pose in degrees (configs/{config.task}.yaml)")
    if not wrong_units:
        steps.append("widen arms.<arm>.lower_limits / upper_limits to cover the checkpoint's dataset, if the arm "
                     "can go there")
    return (f"what to change: {'; '.join(steps)}; or, if the checkpoint is meant to run in these units and limits, "
            "set actuator.units_mismatch_intended: true (docs/configuration.md, \"Units\")")
