"""Synthetic demo datasets in each task's layout, written by LeRobot's own dataset writer.

A demo dataset lets the whole pipeline run without hardware and without downloads: the dataset
player replays it exactly like a recorded LeRobot v3 dataset (parquet + mp4). Each episode is a
smooth joint trajectory inside the config's joint limits (and slower than ``max_step`` per tick),
the action of frame i is the state of frame i+1 (a leading target, as in teleoperated data), and
every camera shows a drawing that moves with the joints (a stick-figure arm on the front camera, the
gripper jaws and a roll-dependent horizon on wrist cameras) plus an episode progress bar, so a viewer
can tell at a glance that a replay is live.

    python -m common.tools.demo_data --task lift --output data/lift-demo [--episodes 3 --frames 150 \
        --width 640 --height 480 --codec av1]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from common.config import REPO_ROOT, SO101_JOINTS, ArmConfig, ConfigError, DeploymentConfig, load_config
from common.layout import dataset_features
from common.wire.contract import ACTION_KEY, STATE_KEY, image_key

log = logging.getLogger(__name__)

# Video codecs the demo writer offers: LeRobot encoder name per short name. AV1 is what the teams'
# real datasets use (LeRobot's default); h264 decodes faster on small CPUs.
CODECS = {"av1": "libsvtav1", "h264": "h264"}
TASK_PROMPTS = {
    "lift": "lift the cube",
    "stack": "stack the red block on the blue block",
    "sort": "sort the parts into the left and right bins",
}

# Per joint (SO101_JOINTS order): centre, amplitude (robot units) and base frequency (Hz) of the
# demo motion. Kept well inside the default limits (+-100..150 degrees, gripper 0..100) and slow
# enough that no joint moves more than ~2 units per tick at 30 fps (max_step is 3..5).
_CENTRE = np.array([0.0, -30.0, 40.0, 30.0, 0.0, 50.0])
_AMPLITUDE = np.array([35.0, 25.0, 25.0, 25.0, 40.0, 40.0])
_FREQUENCY = np.array([0.15, 0.2, 0.18, 0.22, 0.12, 0.25])
_LIMIT_MARGIN = 5.0


@dataclass
class DemoSpec:
    episodes: int = 3
    frames: int = 150  # per episode: 5 s at 30 fps
    width: int = 0  # 0: the config's camera width
    height: int = 0  # 0: the config's camera height
    codec: str = "av1"
    seed: int = 0
    # Blend in a drifting photographic-like texture and sensor grain: frames that cost what camera
    # footage costs to encode and decode (used by bench/decode_rate.py); the plain drawing is cheap.
    texture: bool = False


def arm_trajectory(arm: ArmConfig, frames: int, fps: int, rng: np.random.Generator) -> np.ndarray:
    """(frames, 6) float32 joint positions: two sines per joint with a random phase, clipped to limits."""
    t = np.arange(frames, dtype=np.float64)[:, None] / fps
    phase = rng.uniform(0.0, 2.0 * math.pi, size=(2, len(SO101_JOINTS)))
    scale = rng.uniform(0.7, 1.0, size=len(SO101_JOINTS))
    wave = (np.sin(2.0 * math.pi * _FREQUENCY * t + phase[0])
            + 0.3 * np.sin(2.0 * math.pi * 2.3 * _FREQUENCY * t + phase[1])) / 1.3
    positions = _CENTRE + _AMPLITUDE * scale * wave
    lower = np.asarray(arm.lower_limits, dtype=np.float64) + _LIMIT_MARGIN
    upper = np.asarray(arm.upper_limits, dtype=np.float64) - _LIMIT_MARGIN
    return np.clip(positions, lower, upper).astype(np.float32)


def episode_trajectory(config: DeploymentConfig, episode: int, frames: int, seed: int = 0) -> np.ndarray:
    """(frames, state_dim) states of one demo episode: every arm in config order (left before right)."""
    rng = np.random.default_rng([seed, episode])
    return np.concatenate([arm_trajectory(arm, frames, config.fps, rng) for arm in config.arms.values()], axis=1)


def actions_from_states(states: np.ndarray) -> np.ndarray:
    """Action i = state i+1 (the target the arm reached next); the last frame holds its position."""
    return np.concatenate([states[1:], states[-1:]], axis=0)


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------

_ARM_COLOURS = [(230, 90, 40), (40, 140, 230), (60, 190, 90)]  # RGB per arm


def _draw_stick_arm(image: np.ndarray, joints: np.ndarray, base_x: float, colour: tuple[int, int, int]) -> None:
    """A planar side view: pan shifts the base, lift/elbow/wrist flex bend the links, roll spins a
    spoke at the wrist and the gripper opens two jaws."""
    height, width = image.shape[:2]
    unit = min(height, width)
    pan, lift, elbow, wrist, roll, gripper = (float(v) for v in joints)
    x = base_x + pan / 110.0 * width * 0.12
    y = height * 0.88
    thickness = max(1, unit // 60)
    cv2.rectangle(image, (int(x - unit * 0.06), int(y)), (int(x + unit * 0.06), int(y + unit * 0.05)),
                  colour, -1)
    angle = 0.0  # radians from straight up, positive leans right
    points = [(x, y)]
    for length, joint in ((0.32, lift), (0.28, elbow), (0.14, wrist)):
        angle += math.radians(joint)
        x += math.sin(angle) * unit * length
        y -= math.cos(angle) * unit * length
        points.append((x, y))
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        cv2.line(image, (int(x0), int(y0)), (int(x1), int(y1)), colour, thickness * 2, cv2.LINE_AA)
        cv2.circle(image, (int(x0), int(y0)), thickness * 2, (20, 20, 20), -1)
    spoke = unit * 0.05
    roll_rad = math.radians(roll)
    cv2.line(image, (int(x - math.cos(roll_rad) * spoke), int(y - math.sin(roll_rad) * spoke)),
             (int(x + math.cos(roll_rad) * spoke), int(y + math.sin(roll_rad) * spoke)), (250, 250, 250),
             thickness, cv2.LINE_AA)
    opening = (0.01 + 0.05 * np.clip(gripper, 0.0, 100.0) / 100.0) * unit
    for side in (-1.0, 1.0):
        jx = x + math.cos(angle) * opening * side
        jy = y + math.sin(angle) * opening * side
        tip_x = jx + math.sin(angle) * unit * 0.07
        tip_y = jy - math.cos(angle) * unit * 0.07
        cv2.line(image, (int(jx), int(jy)), (int(tip_x), int(tip_y)), (250, 220, 60), thickness, cv2.LINE_AA)


def _draw_wrist_view(image: np.ndarray, joints: np.ndarray, colour: tuple[int, int, int]) -> None:
    """What a wrist camera sees: a horizon tilted by wrist roll, an object that moves with pan and
    wrist flex, and the two gripper jaws whose gap is the gripper opening."""
    height, width = image.shape[:2]
    pan, _lift, _elbow, wrist, roll, gripper = (float(v) for v in joints)
    centre = np.array([width / 2.0, height / 2.0])
    roll_rad = math.radians(roll)
    direction = np.array([math.cos(roll_rad), math.sin(roll_rad)]) * max(width, height)
    offset = np.array([0.0, wrist / 100.0 * height * 0.3])
    start, end = centre + offset - direction, centre + offset + direction
    cv2.line(image, (int(start[0]), int(start[1])), (int(end[0]), int(end[1])), (90, 90, 90),
             max(1, height // 40), cv2.LINE_AA)
    obj = centre + np.array([-pan / 110.0 * width * 0.35, -wrist / 100.0 * height * 0.25])
    cv2.circle(image, (int(obj[0]), int(obj[1])), max(2, height // 10), colour, -1, cv2.LINE_AA)
    gap = (0.04 + 0.3 * np.clip(gripper, 0.0, 100.0) / 100.0) * width / 2.0
    jaw = max(2, width // 16)
    for side in (-1.0, 1.0):
        inner = width / 2.0 + side * gap
        outer = inner + side * jaw
        left, right = sorted((int(inner), int(outer)))
        cv2.rectangle(image, (left, int(height * 0.55)), (right, height - 1), (250, 220, 60), -1)


def render_camera(camera: str, config: DeploymentConfig, state: np.ndarray, frame_index: int, frames: int,
                  width: int, height: int) -> np.ndarray:
    """The demo image (uint8 HxWx3 RGB) of one camera for one state.

    A wrist camera (name containing "wrist") follows its arm: ``left_wrist`` the arm whose prefix is
    ``left_``, plain ``wrist`` the first arm. Any other camera shows every arm side by side.
    """
    image = np.empty((height, width, 3), dtype=np.uint8)
    # A vertical gradient background, so the codec has something real-looking to encode.
    image[:] = np.linspace(40, 110, height, dtype=np.uint8)[:, None, None]
    arms = list(config.arms.values())
    per_arm = np.split(np.asarray(state, dtype=np.float32), len(arms))
    if "wrist" in camera:
        index = 0
        for position, arm in enumerate(arms):
            if arm.prefix and camera.startswith(arm.prefix):
                index = position
        _draw_wrist_view(image, per_arm[index], _ARM_COLOURS[index % len(_ARM_COLOURS)])
    else:
        cv2.line(image, (0, int(height * 0.93)), (width - 1, int(height * 0.93)), (150, 120, 90),
                 max(1, height // 60))
        for index, joints in enumerate(per_arm):
            base_x = width * (index + 1) / (len(arms) + 1)
            _draw_stick_arm(image, joints, base_x, _ARM_COLOURS[index % len(_ARM_COLOURS)])
    # Progress bar: how far into the episode this frame is.
    bar = round((frame_index + 1) / max(frames, 1) * (width - 1))
    cv2.rectangle(image, (0, 0), (bar, max(1, height // 48)), (240, 240, 240), -1)
    return image


class Texture:
    """A smooth random scene larger than the frame, seen through a window that drifts with time, plus
    per-frame grain: what makes real camera video expensive to code, added to the demo drawing."""

    def __init__(self, width: int, height: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.margin = 32
        coarse = rng.integers(0, 256, ((height + 2 * self.margin) // 8, (width + 2 * self.margin) // 8, 3),
                              dtype=np.uint8)
        scene = cv2.resize(coarse, (width + 2 * self.margin, height + 2 * self.margin),
                           interpolation=cv2.INTER_CUBIC)
        detail = rng.integers(-40, 40, scene.shape, dtype=np.int16)
        self.scene = np.clip(scene.astype(np.int16) + detail, 0, 255).astype(np.uint8)
        self.rng = rng
        self.width, self.height = width, height

    def apply(self, image: np.ndarray, frame_index: int) -> np.ndarray:
        dx = int(self.margin + self.margin * 0.9 * math.sin(frame_index / 23.0))
        dy = int(self.margin + self.margin * 0.9 * math.cos(frame_index / 31.0))
        window = self.scene[dy:dy + self.height, dx:dx + self.width]
        blended = cv2.addWeighted(image, 0.6, window, 0.4, 0.0)
        grain = self.rng.integers(-6, 7, image.shape, dtype=np.int16)
        return np.clip(blended.astype(np.int16) + grain, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def generate_demo_dataset(config: DeploymentConfig, output: Path, spec: DemoSpec | None = None, *,
                          repo_id: str = "", overwrite: bool = False) -> Path:
    """Write a demo LeRobot v3 dataset at ``output`` and return its root."""
    spec = spec or DemoSpec()
    if spec.codec not in CODECS:
        raise ConfigError("--codec", f"expected one of {sorted(CODECS)}, got {spec.codec!r}")
    if spec.episodes < 1 or spec.frames < 2:
        raise ConfigError("--episodes", f"expected at least 1 episode of 2 frames, got {spec.episodes}x{spec.frames}")
    if not config.cameras:
        raise ConfigError("cameras", "expected at least one camera to render")
    first_camera = next(iter(config.cameras.values()))
    width = spec.width or first_camera.width
    height = spec.height or first_camera.height
    # Encoders want even sizes; AV1 (SVT) also at least 64 pixels a side.
    if width % 2 or height % 2 or min(width, height) < 64:
        raise ConfigError("--width", f"expected even sizes of at least 64 pixels, got {width}x{height}")
    output = Path(output)
    if output.exists():
        if not overwrite:
            raise FileExistsError(f"{output} already exists; pass --overwrite to replace it")
        shutil.rmtree(output)
    output.parent.mkdir(parents=True, exist_ok=True)

    # Imported only now: LeRobot (torch, datasets) takes seconds to import, argument errors should not.
    from lerobot.configs.video import RGBEncoderConfig
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    started = time.monotonic()
    robot_type = "bi_so101_follower" if len(config.arms) > 1 else "so101_follower"
    dataset = LeRobotDataset.create(
        repo_id=repo_id or f"armpipe/{config.task}-demo",
        fps=config.fps,
        features=dataset_features(config, (height, width)),
        root=output,
        robot_type=robot_type,
        use_videos=True,
        # g=2 as LeRobot's default: every other frame is a keyframe, cheap random access for training.
        rgb_encoder=RGBEncoderConfig(vcodec=CODECS[spec.codec]),
        # Stream frames straight into the encoder threads (no PNG round trip). The queue holds a whole
        # episode because LeRobot drops frames when it is full, and drawing is faster than encoding.
        streaming_encoding=True,
        encoder_queue_maxsize=spec.frames + 1,
    )
    prompt = TASK_PROMPTS.get(config.task, config.task)
    textures = ({camera: Texture(width, height, spec.seed + number) for number, camera in enumerate(config.cameras)}
                if spec.texture else {})
    try:
        for episode in range(spec.episodes):
            states = episode_trajectory(config, episode, spec.frames, spec.seed)
            actions = actions_from_states(states)
            for index in range(spec.frames):
                frame: dict = {}
                for camera in config.cameras:
                    image = render_camera(camera, config, states[index], index, spec.frames, width, height)
                    frame[image_key(camera)] = textures[camera].apply(image, index) if textures else image
                frame[STATE_KEY] = states[index]
                frame[ACTION_KEY] = actions[index]
                frame["task"] = prompt
                dataset.add_frame(frame)
            dataset.save_episode()
            log.info("episode %d/%d written (%d frames)", episode + 1, spec.episodes, spec.frames)
    finally:
        dataset.finalize()
    log.info("demo dataset %s: %d episodes x %d frames, %d camera(s) %dx%d %s, in %.1f s", output, spec.episodes,
             spec.frames, len(config.cameras), width, height, spec.codec, time.monotonic() - started)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASK_PROMPTS), default="lift")
    parser.add_argument("--config", default="", help="deployment YAML (default: configs/<task>.yaml)")
    parser.add_argument("--output", default="", help="dataset root (default: data/<task>-demo)")
    parser.add_argument("--repo-id", default="", help="default: armpipe/<task>-demo")
    parser.add_argument("--episodes", type=int, default=DemoSpec.episodes)
    parser.add_argument("--frames", type=int, default=DemoSpec.frames, help="frames per episode")
    parser.add_argument("--width", type=int, default=0, help="default: the config's camera width")
    parser.add_argument("--height", type=int, default=0, help="default: the config's camera height")
    parser.add_argument("--codec", choices=sorted(CODECS), default=DemoSpec.codec)
    parser.add_argument("--seed", type=int, default=DemoSpec.seed)
    parser.add_argument("--texture", action="store_true",
                        help="add camera-like texture and grain (realistic decode cost, for benchmarks)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s demo_data: %(message)s")
    try:
        config = load_config(args.config or REPO_ROOT / "configs" / f"{args.task}.yaml")
        output = Path(args.output) if args.output else config.resolve(f"data/{args.task}-demo")
        spec = DemoSpec(episodes=args.episodes, frames=args.frames, width=args.width, height=args.height,
                        codec=args.codec, seed=args.seed, texture=args.texture)
        generate_demo_dataset(config, output, spec, repo_id=args.repo_id, overwrite=args.overwrite)
    except (ConfigError, FileExistsError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
