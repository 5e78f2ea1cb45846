"""The wire side of a chunk: an ``infer`` request checked field by field, its arrays on the device, and
LeRobot's normalisation applied (and undone on the actions).

- ``validate_request``: cameras present, uint8 HxWx3 of the accepted shape, raw or JPEG; state float32 of
  the right size and finite. A bad observation raises ``ProtocolError`` naming the field; nothing is ever
  answered with made-up actions.
- ``InputLoader``: pinned host buffers and asynchronous uploads; JPEG decoded on the GPU (nvJPEG) or with
  OpenCV on a CPU.
- ``Normaliser``: the checkpoint's own stats with LeRobot's expressions, recordable in a CUDA graph.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from common.wire.contract import ACTION_KEY, IMAGE_KEY_PREFIX, RTC_DELAY_KEY, RTC_PREFIX_KEY, STATE_KEY, image_key
from common.wire.protocol import Message, ProtocolError, check_instruction
from nodes.policy.checkpoint import CheckpointError

log = logging.getLogger(__name__)

LANGUAGE_KEY_PREFIX = "observation.language."  # LeRobot's tokenizer step: .tokens and .attention_mask


@dataclass
class RtcPrefix:
    """What a chunk must continue: ``rows[k]`` (robot units) is meant for ``obs_t + k / fps``; the first
    ``delay_rows`` are frozen (inpainted exactly), the rest guide the next rows with a weight that falls
    towards 0 (``guidance_weights``)."""

    rows: np.ndarray  # float32 (n, action_dim)
    delay_rows: int

    def weights(self, schedule: str = "exp") -> np.ndarray:
        return guidance_weights(len(self.rows), self.delay_rows, schedule)


def guidance_weights(rows: int, delay_rows: int, schedule: str = "exp") -> np.ndarray:
    """Per prefix row: 1 for the frozen rows ``k < delay_rows``; for the soft rows after them, with
    ``c = (rows - k) / (rows - delay_rows + 1)`` (falling linearly from below 1 towards 0 at the prefix's end):
    ``linear``: ``c``; ``exp``: ``c * (e^c - 1) / (e - 1)``, the soft mask of real-time chunking (Black et al.
    2025), which lets the rows furthest ahead go sooner."""
    if schedule not in ("exp", "linear"):
        raise ValueError(f"rtc guidance: expected exp or linear, got {schedule!r}")
    k = np.arange(rows, dtype=np.float64)
    c = (rows - k) / (rows - delay_rows + 1)
    soft = c * np.expm1(c) / np.expm1(1.0) if schedule == "exp" else c
    return np.where(k < delay_rows, 1.0, soft).astype(np.float32)


@dataclass
class Observation:
    images: dict[str, np.ndarray]  # camera -> uint8 HxWx3 (raw) or 1-D JPEG bytes
    jpeg: set[str]  # cameras whose image is still JPEG bytes
    state: np.ndarray  # float32 (state_dim,)
    obs_t: float
    rtc: RtcPrefix | None = None
    instruction: str | None = None  # meta.instruction, checked (a language policy's task)


def validate_rtc(msg: Message, action_dim: int, max_rows: int) -> RtcPrefix | None:
    """The optional rtc prefix of an ``infer`` request (``max_rows`` 0: this policy cannot continue one)."""
    has_prefix = RTC_PREFIX_KEY in msg.arrays
    if not has_prefix and RTC_DELAY_KEY not in msg.meta:
        return None
    where = f"arrays[{RTC_PREFIX_KEY}]"
    if max_rows <= 0:
        raise ProtocolError(where, "no rtc prefix: this policy cannot continue one (rtc needs a DiffusionPolicy "
                            "with a mirrored DDIM/DDPM sampler, or a flow-matching SmolVLA / pi0 / pi0.5; contract "
                            "extra.rtc_max_prefix_rows is 0)", "a prefix")
    if not has_prefix:
        raise ProtocolError(where, f"float32 [rows, {action_dim}] prefix rows with meta.{RTC_DELAY_KEY} "
                            "(array is missing)")
    prefix = msg.arrays[RTC_PREFIX_KEY]
    if (prefix.dtype != np.float32 or prefix.ndim != 2 or prefix.shape[1] != action_dim
            or not 1 <= prefix.shape[0] <= max_rows):
        raise ProtocolError(where, f"float32 [1..{max_rows}, {action_dim}] (robot units)",
                            f"{prefix.dtype}{list(prefix.shape)}")
    bad = np.argwhere(~np.isfinite(prefix))
    if len(bad):
        raise ProtocolError(where, "finite values (no NaN or inf)", f"non-finite at row {int(bad[0][0])}")
    delay = msg.meta.get(RTC_DELAY_KEY)
    if isinstance(delay, bool) or not isinstance(delay, int) or not 0 <= delay <= prefix.shape[0]:
        raise ProtocolError(f"meta.{RTC_DELAY_KEY}", f"an integer 0..{prefix.shape[0]} (rows of the prefix "
                            "that are frozen)", delay)
    return RtcPrefix(rows=prefix, delay_rows=delay)


def validate_request(msg: Message, cameras: dict[str, list[int]], state_dim: int, *, action_dim: int = 0,
                     rtc_rows: int = 0, takes_instruction: bool = False) -> Observation:
    """Check an ``infer`` request against the contract; raises ``ProtocolError`` naming the bad field.

    ``rtc_rows``: the longest rtc prefix this policy accepts (0: none). ``takes_instruction``: a language
    policy, which needs ``meta.instruction``; the others check one when it is sent and ignore it."""
    obs_t = msg.meta.get("obs_t")
    if obs_t is None:
        raise ProtocolError("meta.obs_t", "the observation time in seconds (field is missing)")
    if isinstance(obs_t, bool) or not isinstance(obs_t, (int, float)) or not math.isfinite(obs_t):
        raise ProtocolError("meta.obs_t", "a finite number of seconds", obs_t)
    expected_keys = {image_key(name) for name in cameras} | {STATE_KEY, RTC_PREFIX_KEY}
    unknown = sorted(set(msg.arrays) - expected_keys)
    if unknown:
        raise ProtocolError(f"arrays[{unknown[0]}]", f"only the arrays {sorted(expected_keys)}", unknown)
    images: dict[str, np.ndarray] = {}
    jpeg: set[str] = set()
    for name, shape in cameras.items():
        key = image_key(name)
        where = f"arrays[{key}]"
        if key not in msg.arrays:
            raise ProtocolError(where, f"uint8 image {list(shape)} (raw or JPEG) from camera '{name}' "
                                "(array is missing)")
        array = msg.arrays[key]
        if key in msg.jpeg:
            declared = list(msg.jpeg_shapes.get(key, ()))
            if declared != list(shape):
                raise ProtocolError(f"{where}.shape", f"a JPEG image of shape {list(shape)}", declared)
            jpeg.add(name)
        elif array.dtype != np.uint8 or list(array.shape) != list(shape):
            raise ProtocolError(where, f"uint8 {list(shape)} RGB image", f"{array.dtype}{list(array.shape)}")
        images[name] = array
    if STATE_KEY not in msg.arrays:
        raise ProtocolError(f"arrays[{STATE_KEY}]", f"float32 [{state_dim}] joint positions (array is missing)")
    state = msg.arrays[STATE_KEY]
    if state.dtype != np.float32 or list(state.shape) != [state_dim]:
        raise ProtocolError(f"arrays[{STATE_KEY}]", f"float32 [{state_dim}]", f"{state.dtype}{list(state.shape)}")
    bad = np.flatnonzero(~np.isfinite(state))
    if bad.size:
        raise ProtocolError(f"arrays[{STATE_KEY}]", "finite values (no NaN or inf)",
                            f"{state[bad[0]]} at index {int(bad[0])}")
    rtc = validate_rtc(msg, action_dim, rtc_rows)
    instruction = check_instruction(msg.meta, required=takes_instruction)
    return Observation(images=images, jpeg=jpeg, state=state, obs_t=float(obs_t), rtc=rtc, instruction=instruction)


class InputLoader:
    """Wire arrays of a batch of observations -> device tensors: images uint8 (B, 3, H, W), state float32 (B, D).

    JPEG images are decoded on the GPU (nvJPEG through torchvision) when the device is cuda, else with OpenCV
    (``decode_on_host``, which the node runs on its socket thread, before the request joins a batch). Raw
    images and the state go through pinned host buffers of ``max_batch`` rows, so uploads are asynchronous.
    """

    def __init__(self, cameras: dict[str, list[int]], state_dim: int, device: torch.device, max_batch: int = 1) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.max_batch = max(1, max_batch)
        self.staging = {name: torch.empty((self.max_batch, *shape), dtype=torch.uint8, pin_memory=self.cuda)
                        for name, shape in cameras.items()} if self.cuda else {}
        self.state_staging = torch.empty((self.max_batch, state_dim), dtype=torch.float32, pin_memory=self.cuda)
        self.shapes = cameras

    def decode_on_host(self, obs: Observation) -> None:
        """On a CPU device: decode ``obs``'s JPEG images in place (OpenCV), checking their shape; a bad one
        raises ``ProtocolError`` naming it. On a GPU nvJPEG decodes them in ``load``; nothing happens here."""
        if self.cuda or not obs.jpeg:
            return
        for name, image in self._decode_jpeg(obs, sorted(obs.jpeg)).items():
            obs.images[name[len(IMAGE_KEY_PREFIX):]] = image.permute(1, 2, 0).numpy()
        obs.jpeg = set()

    def load(self, obs: Observation) -> dict[str, Tensor]:
        """One observation as a batch of one row."""
        return self.load_batch([obs])

    def load_batch(self, observations: list[Observation]) -> dict[str, Tensor]:
        """``observation.images.<cam>`` -> uint8 (B, 3, H, W) and ``observation.state`` -> float32 (B, D), row i
        from ``observations[i]`` (at most ``max_batch`` of them)."""
        count = len(observations)
        if not 1 <= count <= self.max_batch:
            raise ValueError(f"a batch of 1..{self.max_batch} observations, got {count}")
        decoded = [self._decode_jpeg(obs, sorted(obs.jpeg)) if obs.jpeg else {} for obs in observations]
        out: dict[str, Tensor] = {}
        for name in self.shapes:
            key = image_key(name)
            if any(name in obs.jpeg for obs in observations) or not self.cuda:
                rows = [decoded[row][key] if name in obs.jpeg else
                        torch.from_numpy(np.array(obs.images[name], dtype=np.uint8)).to(self.device).permute(2, 0, 1)
                        for row, obs in enumerate(observations)]
                out[key] = torch.stack(rows)
                continue
            buffer = self.staging[name][:count]
            # Copy through numpy: the received frame is a read-only view, which torch.from_numpy refuses.
            # The previous batch's upload from this buffer has finished: every batch ends in a sync.
            for row, obs in enumerate(observations):
                np.copyto(buffer[row].numpy(), obs.images[name])
            out[key] = buffer.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        states = self.state_staging[:count]
        for row, obs in enumerate(observations):
            np.copyto(states[row].numpy(), obs.state)
        out[STATE_KEY] = states.to(self.device, non_blocking=True)
        if not self.cuda:
            out[STATE_KEY] = out[STATE_KEY].clone()
        return out

    def _decode_jpeg(self, obs: Observation, names: list[str]) -> dict[str, Tensor]:
        decoded: dict[str, Tensor] = {}
        if self.cuda:
            from torchvision.io import decode_jpeg

            payloads = [torch.from_numpy(np.array(obs.images[name], dtype=np.uint8)) for name in names]
            try:
                images = decode_jpeg(payloads, device=self.device)
            except RuntimeError:  # find out which one is corrupt, one at a time
                images = []
                for name, payload in zip(names, payloads, strict=True):
                    try:
                        images.append(decode_jpeg(payload, device=self.device))
                    except RuntimeError as exc:
                        raise ProtocolError(f"arrays[{image_key(name)}]", "a decodable JPEG image",
                                            f"{payload.numel()} undecodable bytes") from exc
            decoded = dict(zip(names, images, strict=True))
        else:
            from common.wire.images import decode_jpeg as cv_decode_jpeg

            for name in names:
                decoded[name] = torch.from_numpy(cv_decode_jpeg(obs.images[name], f"arrays[{image_key(name)}]")
                                                 ).permute(2, 0, 1)
        for name, image in decoded.items():
            height, width, _ = self.shapes[name]
            if tuple(image.shape) != (3, height, width):
                raise ProtocolError(f"arrays[{image_key(name)}].shape", f"a JPEG that decodes to {[height, width, 3]}",
                                    [int(image.shape[1]), int(image.shape[2]), int(image.shape[0])])
        return {image_key(name): image for name, image in decoded.items()}


class FeatureTransform:
    """LeRobot's (un)normalisation of one feature with its denominators computed once.

    The expressions and their order are those of ``lerobot.processor.normalize_processor`` (so results
    are bit-identical), without its per-call bookkeeping and without creating tensors per call, so it can
    be recorded in a CUDA graph.
    """

    BOUNDS: ClassVar[dict[str, tuple[str, str]]] = {"MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"),
                                                     "QUANTILE10": ("q10", "q90")}

    def __init__(self, key: str, mode: str, stats: dict[str, Tensor] | None, eps: float,
                 device: torch.device) -> None:
        self.mode = mode if stats is not None else "IDENTITY"
        if self.mode == "IDENTITY":
            return
        assert stats is not None
        needed = ("mean", "std") if self.mode == "MEAN_STD" else self.BOUNDS.get(self.mode)
        if needed is None:
            raise CheckpointError(f"{key}: normalisation mode {mode} is not supported")
        missing = [name for name in needed if name not in stats]
        if missing:
            raise CheckpointError(f"{key}: {mode} normalisation needs stats {list(needed)}, the checkpoint lacks "
                                  f"{missing}")
        values = {name: stats[name].to(device=device, dtype=torch.float32) for name in needed}
        if self.mode == "MEAN_STD":
            self.offset, self.scale = values["mean"], values["std"]
            self.denom = values["std"] + eps
        else:
            low, high = (values[name] for name in needed)
            denom = high - low
            self.offset = low
            self.denom = torch.where(denom == 0, torch.tensor(eps, device=device, dtype=denom.dtype), denom)

    def normalise(self, x: Tensor) -> Tensor:
        if self.mode == "MEAN_STD":
            return (x - self.offset) / self.denom
        if self.mode == "MIN_MAX":
            return 2 * (x - self.offset) / self.denom - 1
        if self.mode in ("QUANTILES", "QUANTILE10"):
            return 2.0 * (x - self.offset) / self.denom - 1.0
        return x

    def unnormalise(self, x: Tensor) -> Tensor:
        if self.mode == "MEAN_STD":
            return x * self.scale + self.offset
        if self.mode == "MIN_MAX":
            return (x + 1) / 2 * self.denom + self.offset
        if self.mode in ("QUANTILES", "QUANTILE10"):
            return (x + 1.0) * self.denom / 2.0 + self.offset
        return x


def _find_step(pipeline: Any, class_name: str) -> Any | None:
    for step in getattr(pipeline, "steps", []):
        if type(step).__name__ == class_name:
            return step
    return None


def _feature_transform(step: Any, key: str, device: torch.device) -> FeatureTransform:
    feature = step.features.get(key)
    mode = step.norm_map.get(feature.type) if feature is not None else None
    stats = step._tensor_stats.get(key) if mode is not None else None
    return FeatureTransform(key, getattr(mode, "value", "IDENTITY"), stats, step.eps, device)


class Normaliser:
    """Wire-convention inputs -> the normalised batch the model takes, and normalised actions -> robot units.

    With LeRobot's default pipelines (rename with an empty map, batch, device, normalise / unnormalise,
    device) the node applies the pipelines' own stats through ``FeatureTransform`` (``direct``: same
    arithmetic, recordable in a CUDA graph). Pipelines with any other step run as pipelines.
    """

    KNOWN_PRE: ClassVar[set[str]] = {"RenameObservationsProcessorStep", "AddBatchDimensionProcessorStep",
                                     "DeviceProcessorStep", "NormalizerProcessorStep"}
    KNOWN_POST: ClassVar[set[str]] = {"UnnormalizerProcessorStep", "DeviceProcessorStep"}

    def __init__(self, preprocessor: Any, postprocessor: Any, input_keys: list[str], device: torch.device) -> None:
        self.preprocessor = preprocessor
        self.postprocessor = postprocessor
        normalizer = _find_step(preprocessor, "NormalizerProcessorStep")
        unnormalizer = _find_step(postprocessor, "UnnormalizerProcessorStep")
        rename = _find_step(preprocessor, "RenameObservationsProcessorStep")
        pre_names = {type(step).__name__ for step in preprocessor.steps}
        post_names = {type(step).__name__ for step in postprocessor.steps}
        self.direct = (pre_names <= self.KNOWN_PRE and post_names <= self.KNOWN_POST
                       and normalizer is not None and unnormalizer is not None
                       and not (rename is not None and rename.rename_map))
        if self.direct:
            self.inputs = {key: _feature_transform(normalizer, key, device) for key in input_keys}
            self.action = _feature_transform(unnormalizer, ACTION_KEY, device)
        else:
            log.info("processor pipelines have custom steps %s / %s: running them as pipelines",
                     sorted(pre_names - self.KNOWN_PRE), sorted(post_names - self.KNOWN_POST))

    def prepare(self, inputs: dict[str, Tensor], task: str | list[str] | None = None) -> dict[str, Tensor]:
        """uint8 (B, 3, H, W) images and the (B, D) state -> the normalised (B, ...) batch.

        Images become float32 in [0, 1] first: LeRobot's convention for robot frames. ``task``: a language
        policy's instruction, LeRobot's ``task`` input (a list, one per row, for a batch); its pipeline's
        tokenizer step adds the ``observation.language.*`` tokens and mask to the batch.
        """
        batch: dict[str, Any] = {key: value.to(torch.float32) / 255 if key.startswith(IMAGE_KEY_PREFIX) else value
                                 for key, value in inputs.items()}
        if not self.direct:
            if task is not None:
                batch["task"] = task
            out = self.preprocessor(batch)
            return {key: out[key] for key in out if key in inputs or key.startswith(LANGUAGE_KEY_PREFIX)}
        return {key: self.inputs[key].normalise(value) for key, value in batch.items()}

    def normalise_action(self, actions: Tensor) -> Tensor:
        """Robot-unit actions -> the model's normalised action space (the rtc prefix); direct pipelines only."""
        if not self.direct:
            raise CheckpointError("the processor pipelines have custom steps: actions cannot be normalised here")
        return self.action.normalise(actions)

    def unnormalise(self, actions: Tensor) -> Tensor:
        if not self.direct:
            return self.postprocessor(actions)
        return self.action.unnormalise(actions)
