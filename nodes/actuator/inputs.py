"""The actuator's inputs: the newest valid frame of every camera and state of every arm, and the
observation sent to the policy. Malformed messages are rejected, counted and reported (never used)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.config import DeploymentConfig
from common.wire.protocol import INSTRUCTION_KEY, KIND_FRAME, KIND_STATE, Message, ProtocolError, check_instruction
from nodes.actuator.core import JOINTS_PER_ARM
from nodes.actuator.holds import HOLD_MISSING_INPUT, HOLD_STALE_FRAME, HOLD_STALE_STATE

log = logging.getLogger("actuator")


@dataclass
class Observation:
    """One snapshot for the policy: the newest frame of each camera and state of each arm."""

    frames: dict[str, Message]
    state: np.ndarray
    obs_t: float
    inputs: dict[str, int]
    frame_index: int
    # The latency chain's first stamps (docs/protocol.md, section 8), from the oldest part:
    # capture_t, published_t, received_t on this machine's monotonic clock.
    stamps: dict[str, float] = field(default_factory=dict)


class InputBook:
    """The newest valid frame per camera and state per arm; rejects (and reports) malformed ones."""

    def __init__(self, config: DeploymentConfig) -> None:
        self.config = config
        self.frames: dict[str, Message] = {}
        self.states: dict[str, Message] = {}
        self.received: dict[str, float] = {}  # "camera:<name>" / "arm:<name>" -> when its newest message came
        self.bad_inputs = 0
        self.refused_future = 0  # messages stamped ahead of the actuator's clock
        self.refusals: list[dict[str, Any]] = []  # future_capture_time refusals not yet published
        self.max_future_s = config.actuator.max_future_s
        self.task: str | None = None  # the newest valid meta.task of a state (the dataset player's episode task)
        self._last_warning: dict[str, float] = {}

    def ingest(self, msg: Message, now: float | None = None) -> None:
        """Keep ``msg`` if valid. With ``now`` (real time), a capture time more than ``max_future_s`` ahead of
        it is refused: sensors share the actuator's monotonic clock, and a future stamp would keep a stream
        looking fresh for as long as it lies (then the age limit holds as if it had fallen silent)."""
        if now is not None and msg.kind in (KIND_FRAME, KIND_STATE) and msg.t > now + self.max_future_s:
            self.refused_future += 1
            self.bad_inputs += 1
            stream = str(msg.meta.get("camera" if msg.kind == KIND_FRAME else "arm", "?"))
            key = f"future:{msg.kind}:{stream}"
            if now - self._last_warning.get(key, -math.inf) >= 1.0:
                self.refusals.append({"reason": "future_capture_time", "kind": msg.kind, "stream": stream,
                                      "src": msg.src, "ahead_s": msg.t - now, "count": self.refused_future})
            self._warn(key, f"refused {msg.kind} from {msg.src or '?'} ({stream}): capture time {msg.t - now:.3f}s "
                       f"ahead of this clock (actuator.max_future_s {self.max_future_s}s)", every_s=1.0)
            return
        try:
            if msg.kind == KIND_FRAME:
                self._ingest_frame(msg)
            elif msg.kind == KIND_STATE:
                self._ingest_state(msg)
        except ProtocolError as exc:
            self.bad_inputs += 1
            self._warn(f"{msg.kind}:{msg.src}", f"ignored {msg.kind} from {msg.src or '?'}: {exc}")

    def _ingest_frame(self, msg: Message) -> None:
        camera = msg.meta["camera"]
        cam = self.config.cameras.get(camera)
        if cam is None:
            raise ProtocolError("meta.camera", f"one of the configured cameras {sorted(self.config.cameras)}", camera)
        expected = [cam.height, cam.width, 3]
        image = msg.arrays.get("image")
        if image is None:
            raise ProtocolError("arrays[image]", "the camera image (field is missing)")
        if "image" in msg.jpeg:
            shape = list(msg.jpeg_shapes.get("image", ()))
            if shape != expected:
                raise ProtocolError("arrays[image].shape", f"{expected} (cameras.{camera}.height/width)", shape)
        elif image.dtype != np.uint8 or list(image.shape) != expected:
            raise ProtocolError("arrays[image]", f"uint8 {expected} (cameras.{camera}.height/width)",
                                f"{image.dtype}{list(image.shape)}")
        self.frames[camera] = msg
        self.received[f"camera:{camera}"] = time.monotonic()

    def _ingest_state(self, msg: Message) -> None:
        arm_name = msg.meta["arm"]
        arm = self.config.arms.get(arm_name)
        if arm is None:
            raise ProtocolError("meta.arm", f"one of the configured arms {sorted(self.config.arms)}", arm_name)
        if list(msg.meta["names"]) != arm.joint_names():
            raise ProtocolError("meta.names", f"{arm.joint_names()} (arms.{arm_name}.prefix)", msg.meta["names"])
        position = msg.arrays.get("position")
        if position is None or position.dtype != np.float32 or position.shape != (JOINTS_PER_ARM,):
            raise ProtocolError("arrays[position]", f"float32 ({JOINTS_PER_ARM},)",
                                None if position is None else f"{position.dtype}{position.shape}")
        if not np.all(np.isfinite(position)):
            raise ProtocolError("arrays[position]", "finite joint positions", position.tolist())
        self.states[arm_name] = msg
        self.received[f"arm:{arm_name}"] = time.monotonic()
        if "task" in msg.meta:
            # The dataset player's episode task, for actuator.instruction_source: dataset. A bad one is refused like
            # a bad instruction (it would be one), and the state itself is still used.
            try:
                self.task = check_instruction({INSTRUCTION_KEY: msg.meta["task"]}, required=True)
            except ProtocolError as exc:
                self.bad_inputs += 1
                self._warn(f"task:{msg.src}", f"ignored the task of a state from {msg.src or '?'}: meta.task: "
                           f"expected {exc.expected}; got {exc.got}")

    def _warn(self, key: str, text: str, every_s: float = 5.0) -> None:
        now = time.monotonic()
        if now - self._last_warning.get(key, -math.inf) >= every_s:
            self._last_warning[key] = now
            log.warning(text)

    # ------------------------------------------------------------------ views
    def complete(self) -> bool:
        return set(self.frames) >= set(self.config.cameras) and set(self.states) >= set(self.config.arms)

    def measured(self) -> np.ndarray | None:
        """Every arm's newest position in config order, or None if an arm has not reported yet."""
        if not set(self.states) >= set(self.config.arms):
            return None
        return np.concatenate([self.states[name].arrays["position"] for name in self.config.arms]).astype(np.float32)

    def problem(self, now: float | None) -> str:
        """The hold reason the inputs give at ``now`` ("" when everything is present and fresh; with ``now`` None,
        lockstep, whose stamps are the player's: only whether everything is present)."""
        if not self.complete():
            return HOLD_MISSING_INPUT
        if now is None:
            return ""
        for name, arm in self.config.arms.items():
            if now - self.states[name].t > arm.max_state_age_s:
                return HOLD_STALE_STATE
        for name, cam in self.config.cameras.items():
            if now - self.frames[name].t > cam.max_age_s:
                return HOLD_STALE_FRAME
        return ""

    def input_seqs(self) -> dict[str, int]:
        return {**{name: msg.seq for name, msg in self.frames.items()},
                **{name: msg.seq for name, msg in self.states.items()}}

    def frame_index(self) -> int:
        """The dataset frame index of the newest frames (the player stamps it), -1 from live cameras."""
        indices = [msg.meta.get("frame_index") for msg in (*self.frames.values(), *self.states.values())]
        if not indices or any(not isinstance(index, int) or isinstance(index, bool) for index in indices):
            return -1
        return min(indices)

    def observation(self) -> Observation:
        measured = self.measured()
        assert measured is not None and self.complete()
        parts = {**{f"camera:{name}": msg for name, msg in self.frames.items()},
                 **{f"arm:{name}": msg for name, msg in self.states.items()}}
        oldest_key, oldest = min(parts.items(), key=lambda item: item[1].t)
        pub_t = oldest.meta.get("pub_t")
        stamps = {"capture_t": oldest.t,
                  "published_t": float(pub_t) if isinstance(pub_t, (int, float)) and not isinstance(pub_t, bool)
                  else oldest.t,
                  "received_t": self.received.get(oldest_key, oldest.t)}
        return Observation(frames=dict(self.frames), state=measured, obs_t=oldest.t,
                           inputs=self.input_seqs(), frame_index=self.frame_index(), stamps=stamps)
