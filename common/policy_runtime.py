"""Everything the policy node does between a decoded request and its reply, kept out of the node loop.

- Loading: a LeRobot ``pretrained_model/`` directory (or a ``lerobot-train`` run folder, whose last
  checkpoint is taken), fully offline: policy weights plus the pre-/post-processor pipelines with their
  normalisation stats. The checkpoint's layout is checked against the deployment config at start.
- Validation: every observation is checked (cameras present, uint8 HxWx3 of the accepted shape, raw or
  JPEG; state float32 of the right size and finite) and a bad one raises ``ProtocolError`` naming the
  field. Nothing is ever answered with made-up actions.
- Sessions: one per client id, each with its own observation history (DiffusionPolicy's
  ``n_obs_steps``) and its own seeded noise generator, in a bounded LRU.
- Inference paths (all produce the same chunk for the same session seed, up to floating-point rounding):
  * exact: LeRobot's own modules in fp32, eager; matches LeRobot's plain path to rounding.
  * CUDA graphs: the same kernels recorded once and replayed (removes the CPU launch overhead that
    dominates batch-1 diffusion); still bit-for-bit the exact path's arithmetic.
  * fast: bf16 weights (``policy.dtype``), the diffusion UNet restructured for batch 1
    (``policy.fast_unet``: convolutions as matrix products, FiLM for all steps at once), torch.compile,
    then a CUDA graph of the whole loop.

DiffusionPolicy is not run through its own ``select_action`` queue (one queue per policy object, which is
what breaks LeRobot's async server for Diffusion): each session keeps the per-frame conditioning vectors
(normalised state plus image features) of its last ``n_obs_steps`` observations, and the sampler runs on
their concatenation, exactly as ``DiffusionModel.generate_actions`` would on the stacked batch. The
denoising loop mirrors diffusers' DDPM/DDIM ``step`` expression for expression, with the noise drawn up
front from the session's generator in the order diffusers draws it, so it can be captured in a graph.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import re
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from common.config import DeploymentConfig, PolicyConfig
from common.contract import ACTION_KEY, IMAGE_KEY_PREFIX, STATE_KEY, PolicyContract, image_key
from common.protocol import Message, ProtocolError

log = logging.getLogger(__name__)

SIDECAR_NAME = "armpipe.json"  # written by common.checkpoint_maker next to config.json
MODEL_FILE = "model.safetensors"
MAX_CLIENT_ID_LEN = 128


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be served with this deployment; the message says why."""


# lerobot 0.6.1 pins transformers>=5.4,<5.6 (its `transformers-dep` extra) but imports transformers and peft
# at import time whenever they are installed, whatever their version.
LEROBOT_TRANSFORMERS_PIN = ((5, 4), (5, 6))


def transformers_outside_lerobot_pin(version: str) -> bool:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return True
    low, high = LEROBOT_TRANSFORMERS_PIN
    return not low <= (int(match.group(1)), int(match.group(2))) < high


def guard_lerobot_imports() -> None:
    """Keep an unsupported transformers (and peft, which imports it) away from lerobot's import.

    Call before the first lerobot import. DiffusionPolicy and ACT need neither package; with
    ``sys.modules[name] = None`` lerobot's availability probe (``importlib.util.find_spec``) reports them
    missing and lerobot takes its without-transformers branches, as in this project's own environment.
    """
    if "lerobot" in sys.modules:
        return
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return
    if transformers_outside_lerobot_pin(version):
        for name in ("transformers", "peft"):
            sys.modules.setdefault(name, None)  # type: ignore[arg-type]
        log.warning("transformers %s is outside lerobot 0.6.1's supported range %s: hidden from lerobot "
                    "(DiffusionPolicy and ACT do not use it)", version, LEROBOT_TRANSFORMERS_PIN)


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("policy.device: cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


# ------------------------------------------------------------------------------------------------
# Layout check: the checkpoint against the deployment config
# ------------------------------------------------------------------------------------------------


def camera_name(key: str) -> str:
    return key.removeprefix(IMAGE_KEY_PREFIX)


def layout_differences(policy_config: Any, config: DeploymentConfig, sidecar: dict[str, Any]) -> list[str]:
    """Every way the checkpoint's features disagree with the deployment; empty when it can be served."""
    problems: list[str] = []
    checkpoint_cameras = {camera_name(key): tuple(feature.shape)
                          for key, feature in policy_config.image_features.items()}
    config_cameras = {name: (3, cam.height, cam.width) for name, cam in config.cameras.items()}
    for name in sorted(set(checkpoint_cameras) - set(config_cameras)):
        problems.append(f"checkpoint needs camera '{name}' (image {list(checkpoint_cameras[name])}), which the "
                        f"config does not have (config cameras: {sorted(config_cameras)})")
    for name in sorted(set(config_cameras) - set(checkpoint_cameras)):
        problems.append(f"config camera '{name}' is not an input of the checkpoint (checkpoint cameras: "
                        f"{sorted(checkpoint_cameras)})")
    for name in sorted(set(config_cameras) & set(checkpoint_cameras)):
        if checkpoint_cameras[name] != config_cameras[name]:
            channels, height, width = checkpoint_cameras[name]
            cam = config.cameras[name]
            problems.append(f"camera '{name}': checkpoint expects {height}x{width} images ({channels} channels), "
                            f"config cameras.{name} produces {cam.height}x{cam.width}")
    state_feature = policy_config.robot_state_feature
    state_names = config.state_names()
    if state_feature is None:
        problems.append(f"checkpoint has no `{STATE_KEY}` input; the config provides {len(state_names)} joints")
    elif tuple(state_feature.shape) != (len(state_names),):
        problems.append(f"state: checkpoint expects {list(state_feature.shape)} values, config has {len(state_names)} "
                        f"joints ({state_names})")
    action_feature = policy_config.action_feature
    action_names = config.action_names()
    if action_feature is None:
        problems.append(f"checkpoint has no `{ACTION_KEY}` output")
    elif tuple(action_feature.shape) != (len(action_names),):
        problems.append(f"action: checkpoint returns {list(action_feature.shape)} values, config drives "
                        f"{len(action_names)} joints ({action_names})")
    for key, mine in (("state_names", state_names), ("action_names", action_names)):
        if key in sidecar and list(sidecar[key]) != mine:
            problems.append(f"{key}: checkpoint was built for {sidecar[key]}, config has {mine}")
    if "fps" in sidecar and int(sidecar["fps"]) != config.fps:
        problems.append(f"fps: checkpoint was built for {sidecar['fps']} fps, config runs at {config.fps}")
    other = [key for key, feature in policy_config.input_features.items()
             if key != STATE_KEY and key not in policy_config.image_features and feature.type.name != "LANGUAGE"]
    if other:
        problems.append(f"checkpoint needs inputs armpipe does not send: {other}")
    return problems


# ------------------------------------------------------------------------------------------------
# Sessions
# ------------------------------------------------------------------------------------------------


def session_seed(base_seed: int, client: str) -> int:
    """A stable 63-bit seed from ``policy.seed`` and the client id (Python's hash() is salted per process)."""
    digest = hashlib.sha256(f"{base_seed}:{client}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class Session:
    client: str
    seed: int
    generator: torch.Generator
    history: deque[Tensor]  # per-frame conditioning (diffusion) or nothing (single-frame policies)
    requests: int = 0
    last_used: float = field(default_factory=time.monotonic)

    def reset(self) -> None:
        self.history.clear()
        # Reseed as well, so an episode after a reset replays exactly like the first one.
        self.generator.manual_seed(self.seed)


class SessionStore:
    """Per-client sessions in a bounded LRU: the least recently used one is dropped when full."""

    def __init__(self, max_sessions: int, base_seed: int, history_len: int, device: torch.device) -> None:
        self.max_sessions = max(1, max_sessions)
        self.base_seed = base_seed
        self.history_len = history_len
        self.device = device
        self.sessions: OrderedDict[str, Session] = OrderedDict()

    def get(self, client: str) -> Session:
        session = self.sessions.get(client)
        if session is None:
            seed = session_seed(self.base_seed, client)
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
            session = Session(client=client, seed=seed, generator=generator, history=deque(maxlen=self.history_len))
            self.sessions[client] = session
            while len(self.sessions) > self.max_sessions:
                dropped, _ = self.sessions.popitem(last=False)
                log.info("session limit %d reached: dropped least recently used session %s", self.max_sessions,
                         dropped)
        self.sessions.move_to_end(client)
        session.last_used = time.monotonic()
        return session

    def reset(self, client: str) -> None:
        session = self.sessions.get(client)
        if session is not None:
            session.reset()


# ------------------------------------------------------------------------------------------------
# Observation validation
# ------------------------------------------------------------------------------------------------


@dataclass
class Observation:
    images: dict[str, np.ndarray]  # camera -> uint8 HxWx3 (raw) or 1-D JPEG bytes
    jpeg: set[str]  # cameras whose image is still JPEG bytes
    state: np.ndarray  # float32 (state_dim,)
    obs_t: float


def validate_request(msg: Message, cameras: dict[str, list[int]], state_dim: int) -> Observation:
    """Check an ``infer`` request against the contract; raises ``ProtocolError`` naming the bad field."""
    obs_t = msg.meta.get("obs_t")
    if obs_t is None:
        raise ProtocolError("meta.obs_t", "the observation time in seconds (field is missing)")
    if isinstance(obs_t, bool) or not isinstance(obs_t, (int, float)) or not math.isfinite(obs_t):
        raise ProtocolError("meta.obs_t", "a finite number of seconds", obs_t)
    expected_keys = {image_key(name) for name in cameras} | {STATE_KEY}
    unknown = sorted(set(msg.arrays) - expected_keys)
    if unknown:
        raise ProtocolError(f"arrays[{unknown[0]}]", f"only the arrays {sorted(expected_keys)}", unknown)
    jpeg_shapes = msg.meta.get("_jpeg_shapes", {})
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
            declared = list(jpeg_shapes.get(key, []))
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
    return Observation(images=images, jpeg=jpeg, state=state, obs_t=float(obs_t))


# ------------------------------------------------------------------------------------------------
# Upload, JPEG decoding and normalisation
# ------------------------------------------------------------------------------------------------


class InputLoader:
    """Wire arrays -> device tensors: images uint8 (3, H, W), state float32 (D,).

    JPEG images are decoded on the GPU (nvJPEG through torchvision) when the device is cuda, else with
    OpenCV. Raw images and the state go through pinned host buffers, so uploads are asynchronous.
    """

    def __init__(self, cameras: dict[str, list[int]], state_dim: int, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.staging = {name: torch.empty(tuple(shape), dtype=torch.uint8, pin_memory=self.cuda)
                        for name, shape in cameras.items()}
        self.state_staging = torch.empty(state_dim, dtype=torch.float32, pin_memory=self.cuda)
        self.shapes = cameras

    def load(self, obs: Observation) -> dict[str, Tensor]:
        """``observation.images.<cam>`` -> uint8 (3, H, W) and ``observation.state`` -> float32 (D,)."""
        out: dict[str, Tensor] = {}
        jpeg_names = sorted(obs.jpeg)
        if jpeg_names:
            out.update(self._decode_jpeg(obs, jpeg_names))
        for name, image in obs.images.items():
            if name in obs.jpeg:
                continue
            buffer = self.staging[name]
            # Copy through numpy: the received frame is a read-only view, which torch.from_numpy refuses.
            # The previous request's upload from this buffer has finished: every request ends in a sync.
            np.copyto(buffer.numpy(), image)
            out[image_key(name)] = buffer.to(self.device, non_blocking=True).permute(2, 0, 1)
        np.copyto(self.state_staging.numpy(), obs.state)
        out[STATE_KEY] = self.state_staging.to(self.device, non_blocking=True)
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
            from common.images import decode_jpeg as cv_decode_jpeg

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

    def prepare(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """uint8 (3, H, W) images and the (D,) state -> the normalised (1, ...) batch.

        Images become float32 in [0, 1] first: LeRobot's convention for robot frames.
        """
        batch = {key: value.to(torch.float32) / 255 if key.startswith(IMAGE_KEY_PREFIX) else value
                 for key, value in inputs.items()}
        if not self.direct:
            out = self.preprocessor(batch)
            return {key: out[key] for key in inputs}
        return {key: self.inputs[key].normalise(value.unsqueeze(0)) for key, value in batch.items()}

    def unnormalise(self, actions: Tensor) -> Tensor:
        if not self.direct:
            return self.postprocessor(actions)
        return self.action.unnormalise(actions)


# ------------------------------------------------------------------------------------------------
# Speed helpers
# ------------------------------------------------------------------------------------------------


class MatmulConv1d(nn.Module):
    """An ``nn.Conv1d`` computed as one matrix product over its unfolded input windows.

    At batch 1 cuDNN's Conv1d spends most of its time converting memory layouts; a GEMM on the
    (time, kernel*in_channels) window matrix reads the weights once and little else. Same maths,
    different summation order (not bit-identical).
    """

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        out_channels, in_channels, kernel = conv.weight.shape
        self.kernel = kernel
        self.stride = int(conv.stride[0])
        self.padding = int(conv.padding[0])  # type: ignore[index]
        # (out, in, k) -> (out, k*in), the (k, in) order of the windows below.
        self.weight = nn.Parameter(conv.weight.detach().permute(0, 2, 1).reshape(out_channels, kernel * in_channels)
                                   .contiguous(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, T) -> (B, C_out, T')
        if self.kernel == 1 and self.stride == 1 and self.padding == 0:
            windows = x.transpose(1, 2)
        else:
            padded = nn.functional.pad(x, (self.padding, self.padding))
            # unfold: (B, C_in, T', k) -> (B, T', k, C_in) -> (B, T', k*C_in)
            windows = padded.unfold(2, self.kernel, self.stride).permute(0, 2, 3, 1).flatten(2)
        return nn.functional.linear(windows, self.weight, self.bias).transpose(1, 2)

    @staticmethod
    def convertible(module: nn.Module) -> bool:
        return (type(module) is nn.Conv1d and module.dilation == (1,) and module.groups == 1
                and module.padding_mode == "zeros" and isinstance(module.padding, tuple))


class MatmulConvTranspose1d(nn.Module):
    """An ``nn.ConvTranspose1d``, as the equivalent stride-1 convolution of the zero-upsampled input,
    computed as one matrix product (see ``MatmulConv1d``)."""

    def __init__(self, conv: nn.ConvTranspose1d) -> None:
        super().__init__()
        in_channels, out_channels, kernel = conv.weight.shape
        self.kernel = kernel
        self.stride = int(conv.stride[0])
        self.pad_left = kernel - 1 - int(conv.padding[0])
        self.pad_right = self.pad_left + int(conv.output_padding[0])
        # Equivalent convolution weight: w[o, i, j] = W[i, o, k-1-j], laid out as (out, k*in).
        self.weight = nn.Parameter(conv.weight.detach().flip(-1).permute(1, 2, 0).reshape(out_channels,
                                                                                            kernel * in_channels)
                                   .contiguous(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, length = x.shape
        upsampled = x.new_zeros(batch, channels, (length - 1) * self.stride + 1)
        upsampled[..., :: self.stride] = x
        padded = nn.functional.pad(upsampled, (self.pad_left, self.pad_right))
        windows = padded.unfold(2, self.kernel, 1).permute(0, 2, 3, 1).flatten(2)
        return nn.functional.linear(windows, self.weight, self.bias).transpose(1, 2)

    @staticmethod
    def convertible(module: nn.Module) -> bool:
        return (type(module) is nn.ConvTranspose1d and module.dilation == (1,) and module.groups == 1
                and module.padding_mode == "zeros" and module.kernel_size[0] - 1 >= module.padding[0])


def convs_as_matmul(root: nn.Module) -> int:
    """Replace every convertible Conv1d / ConvTranspose1d under ``root`` in place; returns how many."""
    count = 0
    for name, child in list(root.named_children()):
        if MatmulConv1d.convertible(child):
            setattr(root, name, MatmulConv1d(child))
            count += 1
        elif MatmulConvTranspose1d.convertible(child):
            setattr(root, name, MatmulConvTranspose1d(child))
            count += 1
        else:
            count += convs_as_matmul(child)
    return count


class CudaGraph:
    """``fn`` recorded once as a CUDA graph on static input buffers; calling it replays the recording.

    The returned tensors are the graph's static outputs: they are overwritten by the next call, so
    callers consume or clone them first.
    """

    def __init__(self, fn: Callable[..., Any], example_inputs: list[Tensor], warmup: int = 2) -> None:
        self.inputs = [tensor.clone() for tensor in example_inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # lets torch.compile and cuDNN settle before recording
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)

    def __call__(self, *inputs: Tensor) -> Any:
        for buffer, value in zip(self.inputs, inputs, strict=True):
            buffer.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.outputs


class MaybeGraphed:
    """``fn`` run eagerly, or recorded as a CUDA graph on its first call and replayed afterwards.

    If recording fails (a model doing something a capture cannot hold, e.g. a host sync) it logs why and
    stays eager.
    """

    def __init__(self, fn: Callable[..., Any], name: str, enabled: bool) -> None:
        self.fn = fn
        self.name = name
        self.enabled = enabled
        self.graph: CudaGraph | None = None

    def __call__(self, *inputs: Tensor) -> Any:
        if not self.enabled:
            return self.fn(*inputs)
        if self.graph is None:
            try:
                self.graph = CudaGraph(self.fn, list(inputs))
            except RuntimeError as exc:
                log.warning("CUDA graph of %s could not be recorded (%s); running it eagerly", self.name,
                            str(exc).splitlines()[0])
                self.enabled = False
                torch.cuda.synchronize()
                return self.fn(*inputs)
        return self.graph(*inputs)


@dataclass
class SpeedOptions:
    device: torch.device
    dtype: torch.dtype
    num_inference_steps: int  # 0 keeps the checkpoint's
    noise_scheduler: str  # "" keeps the checkpoint's
    compile: bool
    cuda_graphs: bool
    fast_unet: bool

    def autocast(self) -> torch.autocast:
        """bf16 runs the bf16 weights under autocast: ops LeRobot feeds fp32 tensors (timestep embeddings,
        positional encodings) are cast, and the numerically touchy ones (norms, softmax) stay fp32."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.dtype == torch.bfloat16)

    @property
    def exact(self) -> bool:
        """fp32 eager or fp32 graphs of LeRobot's own modules: the same arithmetic as LeRobot's plain path."""
        return self.dtype == torch.float32 and not self.compile and not self.fast_unet

    @classmethod
    def from_config(cls, policy: PolicyConfig, device: torch.device) -> SpeedOptions:
        on_cuda = device.type == "cuda"
        if policy.cuda_graphs and not on_cuda:
            log.warning("policy.cuda_graphs needs a CUDA device; running eagerly on %s", device)
        return cls(device=device, dtype=torch.bfloat16 if policy.dtype == "bf16" else torch.float32,
                   num_inference_steps=policy.num_inference_steps, noise_scheduler=policy.noise_scheduler.upper(),
                   compile=policy.compile, cuda_graphs=policy.cuda_graphs and on_cuda, fast_unet=policy.fast_unet)


# ------------------------------------------------------------------------------------------------
# Diffusion
# ------------------------------------------------------------------------------------------------


@dataclass
class _DenoiseStep:
    """One reverse step, with every scheduler coefficient precomputed as diffusers computes it."""

    unet_t: Tensor  # (1,) long on the device: the timestep the UNet sees
    eps_coeff: Tensor  # beta_prod_t ** 0.5
    x0_div: Tensor  # alpha_prod_t ** 0.5
    prev_x0_coeff: Tensor
    prev_sample_coeff: Tensor  # DDPM: times the current sample; DDIM: times the predicted epsilon
    noise_std: Tensor | None  # DDPM with t > 0: variance ** 0.5; the noise is drawn up front
    noise_index: int = -1


def diffusers_steps(scheduler: Any, scheduler_type: str, device: torch.device) -> list[_DenoiseStep]:
    """The coefficients of diffusers' DDPM/DDIM ``step`` for each timestep, computed with the same tensor
    expressions (CPU float32, as diffusers does), so the loop below reproduces ``step`` exactly."""
    steps: list[_DenoiseStep] = []
    draws = 0
    for t in scheduler.timesteps:
        unet_t = torch.full((1,), int(t), dtype=torch.long, device=device)
        if scheduler_type == "DDPM":
            prev_t = scheduler.previous_timestep(t)
            alpha_prod_t = scheduler.alphas_cumprod[t]
            alpha_prod_t_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.one
            beta_prod_t = 1 - alpha_prod_t
            beta_prod_t_prev = 1 - alpha_prod_t_prev
            current_alpha_t = alpha_prod_t / alpha_prod_t_prev
            current_beta_t = 1 - current_alpha_t
            prev_x0 = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
            prev_sample = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
            noise_std = scheduler._get_variance(t) ** 0.5 if t > 0 else None
        else:
            prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
            alpha_prod_t = scheduler.alphas_cumprod[t]
            alpha_prod_t_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
            beta_prod_t = 1 - alpha_prod_t
            # eta = 0 (what LeRobot calls): std_dev_t is 0 and no noise is drawn.
            std_dev_t = 0.0 * scheduler._get_variance(t, prev_t) ** (0.5)
            prev_x0 = alpha_prod_t_prev ** (0.5)
            prev_sample = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5)
            noise_std = None
        step = _DenoiseStep(unet_t=unet_t, eps_coeff=beta_prod_t ** (0.5), x0_div=alpha_prod_t ** (0.5),
                            prev_x0_coeff=prev_x0, prev_sample_coeff=prev_sample, noise_std=noise_std)
        if noise_std is not None:
            step.noise_index = draws
            draws += 1
        steps.append(step)
    return steps


class FastDenoiser:
    """The denoising loop restructured for batch 1 (``policy.fast_unet``; not bit-identical to LeRobot).

    - Every Conv1d / ConvTranspose1d of LeRobot's UNet runs as one matrix product.
    - FiLM conditioning does not depend on the sample: the timestep embeddings and every residual block's
      FiLM scale/bias for ALL steps are computed before the loop, one matrix product per block.
    - One step (UNet + scheduler update with coefficients from a device table) is one function, compiled
      once (``policy.compile``) and reused for every step, so a CUDA graph of the loop holds few kernels.
    LeRobot's modules and weights are used throughout; only the order of evaluation changes.
    """

    def __init__(self, unet: nn.Module, steps: list[_DenoiseStep], scheduler_type: str, scheduler_config: Any,
                 options: SpeedOptions) -> None:
        self.unet = unet
        self.options = options
        replaced = convs_as_matmul(unet)
        log.info("fast UNet: %d convolutions run as matrix products", replaced)
        self.blocks = [block for down in unet.down_modules for block in down[:2]]
        self.blocks += list(unet.mid_modules)
        self.blocks += [block for up in unet.up_modules for block in up[:2]]
        device = options.device
        self.timesteps = torch.cat([step.unet_t for step in steps])
        draws = sum(step.noise_std is not None for step in steps)
        ddpm = scheduler_type == "DDPM"
        rows = [[float(s.eps_coeff), float(s.x0_div), float(s.prev_x0_coeff),
                 float(s.prev_sample_coeff) if ddpm else 0.0, 0.0 if ddpm else float(s.prev_sample_coeff),
                 0.0 if s.noise_std is None else float(s.noise_std)] for s in steps]
        self.coeffs = torch.tensor(rows, dtype=torch.float32, device=device)
        self.step_index = [torch.tensor([i], device=device) for i in range(len(steps))]
        # Steps without noise read the zero row after the drawn ones.
        self.noise_index = [torch.tensor([s.noise_index if s.noise_std is not None else draws], device=device)
                            for s in steps]
        self.prediction_type = scheduler_config.prediction_type
        self.clip = scheduler_config.clip_sample
        self.clip_range = scheduler_config.clip_sample_range
        self.step = torch.compile(self._step, dynamic=False) if options.compile else self._step

    def _block(self, block: nn.Module, x: Tensor, film: Tensor) -> Tensor:
        """DiffusionConditionalResidualBlock1d.forward with its FiLM embedding given."""
        out = block.conv1(x)
        film = film.unsqueeze(-1)
        if block.use_film_scale_modulation:
            out = film[:, : block.out_channels] * out + film[:, block.out_channels:]
        else:
            out = out + film
        out = block.conv2(out)
        return out + block.residual_conv(x)

    def _unet(self, sample: Tensor, films: list[Tensor]) -> Tensor:
        """DiffusionConditionalUnet1d.forward with the per-block FiLM embeddings given."""
        unet = self.unet
        x = sample.transpose(1, 2)  # (B, T, D) -> (B, D, T)
        film = iter(films)
        skips: list[Tensor] = []
        for block1, block2, downsample in unet.down_modules:
            x = self._block(block2, self._block(block1, x, next(film)), next(film))
            skips.append(x)
            x = downsample(x)
        for block in unet.mid_modules:
            x = self._block(block, x, next(film))
        for block1, block2, upsample in unet.up_modules:
            x = torch.cat((x, skips.pop()), dim=1)
            x = upsample(self._block(block2, self._block(block1, x, next(film)), next(film)))
        return unet.final_conv(x).transpose(1, 2)

    def films(self, global_cond: Tensor) -> list[Tensor]:
        """Every block's FiLM embedding for every step: a list of (steps, channels) tensors."""
        with self.options.autocast():
            embeddings = self.unet.diffusion_step_encoder(self.timesteps)
            feature = torch.cat([embeddings, global_cond.expand(len(self.timesteps), -1)], dim=-1)
            return [block.cond_encoder(feature) for block in self.blocks]

    def _step(self, sample: Tensor, films: list[Tensor], index: Tensor, step_noise: Tensor,
              noise_index: Tensor) -> Tensor:
        with self.options.autocast():
            model_output = self._unet(sample, [film.index_select(0, index) for film in films]).float()
        eps_coeff, x0_div, c_x0, c_sample, c_eps, noise_std = self.coeffs.index_select(0, index)[0].unbind()
        if self.prediction_type == "epsilon":
            x0 = (sample - eps_coeff * model_output) / x0_div
            eps = model_output
        else:
            x0 = model_output
            eps = (sample - x0_div * x0) / eps_coeff
        if self.clip:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        noise = step_noise.index_select(0, noise_index)[0]
        return c_x0 * x0 + c_sample * sample + c_eps * eps + noise_std * noise

    def sample(self, global_cond: Tensor, noise: Tensor, step_noise: Tensor) -> Tensor:
        films = self.films(global_cond)
        sample = noise
        for index, noise_index in zip(self.step_index, self.noise_index, strict=True):
            sample = self.step(sample, films, index, step_noise, noise_index)
        return sample


class DiffusionEngine:
    """DiffusionPolicy served per session: per-frame conditioning history + a mirrored denoising loop."""

    def __init__(self, policy: Any, options: SpeedOptions, prepare: Callable[[dict[str, Tensor]], dict[str, Tensor]],
                 input_keys: list[str]) -> None:
        from lerobot.policies.diffusion.modeling_diffusion import _make_noise_scheduler

        self.options = options
        self.config = cfg = policy.config
        self.model = policy.diffusion
        self.prepare = prepare
        self.input_keys = input_keys
        scheduler_type = options.noise_scheduler or cfg.noise_scheduler_type
        if scheduler_type not in ("DDPM", "DDIM"):
            raise CheckpointError(f"policy.noise_scheduler: expected DDPM or DDIM, got {scheduler_type!r}")
        self.scheduler = _make_noise_scheduler(
            scheduler_type, num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
            beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule, clip_sample=cfg.clip_sample,
            clip_sample_range=cfg.clip_sample_range, prediction_type=cfg.prediction_type)
        self.scheduler_type = scheduler_type
        self.num_steps = options.num_inference_steps or self.model.num_inference_steps
        if not 1 <= self.num_steps <= cfg.num_train_timesteps:
            raise CheckpointError(f"policy.num_inference_steps: expected 1..{cfg.num_train_timesteps}, got "
                                  f"{self.num_steps}")
        self.scheduler.set_timesteps(self.num_steps)
        self.horizon = cfg.horizon
        self.action_dim = cfg.action_feature.shape[0]
        self.n_obs_steps = cfg.n_obs_steps
        self.n_action_steps = cfg.n_action_steps
        self.device = options.device
        self.mirrored = self._mirror_supported()
        self.steps = diffusers_steps(self.scheduler, scheduler_type, self.device) if self.mirrored else []
        self.noise_draws = sum(step.noise_std is not None for step in self.steps)

        if not options.exact:
            torch.backends.cudnn.benchmark = True
            if self.device.type == "cuda":
                self.model.rgb_encoder.to(memory_format=torch.channels_last)  # NHWC suits tensor-core convs
        self.model.to(dtype=options.dtype)
        self.fast: FastDenoiser | None = None
        if options.fast_unet and self.mirrored:
            self.fast = FastDenoiser(self.model.unet, self.steps, scheduler_type, self.scheduler.config, options)
        self.unet: Callable[..., Tensor] = self.model.unet
        if options.compile and self.fast is None:
            self.unet = torch.compile(self.model.unet, dynamic=False)
        graphs = options.cuda_graphs
        if graphs and not self.mirrored:
            log.warning("this scheduler configuration is not mirrored; the sampler runs without CUDA graphs")
        self.encode = MaybeGraphed(self._encode_inputs, "diffusion encoder", graphs)
        self.sample = MaybeGraphed(self.fast.sample if self.fast else self._sample, "diffusion sampler",
                                   graphs and self.mirrored)

    # -------------------------------------------------------------- scheduler mirror
    def _mirror_supported(self) -> bool:
        sched = self.scheduler.config
        if sched.get("thresholding", False) or sched.get("prediction_type") not in ("epsilon", "sample"):
            return False
        return self.scheduler_type == "DDIM" or sched.get("variance_type", "fixed_small") == "fixed_small"

    def _unet(self, sample: Tensor, step: _DenoiseStep, global_cond: Tensor) -> Tensor:
        with self.options.autocast():
            return self.unet(sample, step.unet_t, global_cond=global_cond).float()

    def _sample(self, global_cond: Tensor, noise: Tensor, step_noise: Tensor) -> Tensor:
        """The reverse diffusion loop; diffusers' step maths with the noise passed in. Returns fp32 (1, H, A)."""
        cfg = self.scheduler.config
        sample = noise
        for step in self.steps:
            model_output = self._unet(sample, step, global_cond)
            if cfg.prediction_type == "epsilon":
                pred_original = (sample - step.eps_coeff * model_output) / step.x0_div
                pred_epsilon = model_output
            else:
                pred_original = model_output
                pred_epsilon = (sample - step.x0_div * pred_original) / step.eps_coeff
            if cfg.clip_sample:
                pred_original = pred_original.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
            if self.scheduler_type == "DDPM":
                sample = step.prev_x0_coeff * pred_original + step.prev_sample_coeff * sample
                if step.noise_std is not None:
                    sample = sample + step.noise_std * step_noise[step.noise_index]
            else:
                direction = step.prev_sample_coeff * pred_epsilon
                sample = step.prev_x0_coeff * pred_original + direction
        return sample

    def _draw_noise(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Initial sample then one draw per noisy step, in the order diffusers draws them; a zero row last."""
        shape = (1, self.horizon, self.action_dim)
        noise = torch.randn(shape, dtype=torch.float32, device=self.device, generator=generator)
        step_noise = torch.zeros((self.noise_draws + 1, *shape), dtype=torch.float32, device=self.device)
        for index in range(self.noise_draws):
            torch.randn(shape, generator=generator, out=step_noise[index])
        return noise, step_noise

    # -------------------------------------------------------------- encoder
    def _encode_inputs(self, *tensors: Tensor) -> Tensor:
        """One frame's inputs (uint8 images, state; or already normalised) -> fp32 conditioning (1, C)."""
        batch = self.prepare(dict(zip(self.input_keys, tensors, strict=True)))
        images = torch.stack([batch[key] for key in self.config.image_features], dim=1)  # (1, n_cams, 3, H, W)
        frame = {STATE_KEY: batch[STATE_KEY].unsqueeze(1), "observation.images": images.unsqueeze(1)}
        with self.options.autocast():
            return self.model._prepare_global_conditioning(frame).float()

    # -------------------------------------------------------------- public
    @torch.no_grad()
    def chunk(self, session: Session, inputs: dict[str, Tensor]) -> Tensor:
        cond = self.encode(*(inputs[key] for key in self.input_keys)).clone()
        history = list(session.history) or [cond] * (self.n_obs_steps - 1)  # LeRobot repeats the first frame
        frames = [*history[len(history) - (self.n_obs_steps - 1):], cond] if self.n_obs_steps > 1 else [cond]
        global_cond = torch.cat(frames, dim=-1)
        if self.mirrored:
            noise, step_noise = self._draw_noise(session.generator)
            sample = self.sample(global_cond, noise, step_noise)
        else:
            self.model.noise_scheduler = self.scheduler
            self.model.num_inference_steps = self.num_steps
            sample = self.model.conditional_sample(1, global_cond=global_cond, generator=session.generator).float()
        start = self.n_obs_steps - 1
        actions = sample[:, start:start + self.n_action_steps].clone()
        # Only a successful chunk moves the history on, so a failed request leaves the session as it was.
        if not session.history:
            session.history.extend([cond] * (self.n_obs_steps - 1))
        session.history.append(cond)
        return actions

    @property
    def chunk_length(self) -> int:
        return self.n_action_steps

    def describe(self) -> dict[str, Any]:
        return {"noise_scheduler": self.scheduler_type, "num_inference_steps": self.num_steps,
                "horizon": self.horizon, "mirrored_sampler": self.mirrored}


# ------------------------------------------------------------------------------------------------
# Single-observation chunking policies (ACT, ...)
# ------------------------------------------------------------------------------------------------


class ChunkEngine:
    """Policies with ``n_obs_steps == 1`` whose ``predict_action_chunk`` returns the chunk (ACT, ...)."""

    def __init__(self, policy: Any, options: SpeedOptions, prepare: Callable[[dict[str, Tensor]], dict[str, Tensor]],
                 input_keys: list[str]) -> None:
        self.policy = policy
        self.options = options
        self.config = policy.config
        self.prepare = prepare
        self.input_keys = input_keys
        if getattr(self.config, "n_obs_steps", 1) != 1:
            raise CheckpointError(f"policy type '{self.config.type}' with n_obs_steps={self.config.n_obs_steps} is "
                                  "not supported (only DiffusionPolicy keeps an observation history here)")
        self.n_action_steps = int(getattr(self.config, "n_action_steps", 0) or getattr(self.config, "chunk_size", 1))
        if not options.exact:
            torch.backends.cudnn.benchmark = True
        policy.to(dtype=options.dtype)
        forward: Callable[..., Tensor] = self._forward
        if options.compile:
            forward = torch.compile(self._forward, dynamic=False)
        self.forward = forward
        # The device context only while recording: eagerly it would only add per-op overhead.
        self.run = MaybeGraphed(self._forward_on_device if options.cuda_graphs else self.forward,
                                f"{self.config.type} forward", options.cuda_graphs)

    def _forward(self, *tensors: Tensor) -> Tensor:
        batch = self.prepare(dict(zip(self.input_keys, tensors, strict=True)))
        with self.options.autocast():
            return self.policy.predict_action_chunk(batch)[:, : self.n_action_steps].float()

    def _forward_on_device(self, *tensors: Tensor) -> Tensor:
        # Tensors LeRobot creates without a device (ACT: torch.zeros(...).to(device)) are made on the
        # device directly: a CPU-to-GPU copy cannot be recorded in a CUDA graph.
        with torch.device(self.options.device):
            return self.forward(*tensors)

    @torch.no_grad()
    def chunk(self, session: Session, inputs: dict[str, Tensor]) -> Tensor:
        return self.run(*(inputs[key] for key in self.input_keys)).clone()

    @property
    def chunk_length(self) -> int:
        return self.n_action_steps

    def describe(self) -> dict[str, Any]:
        return {}


# ------------------------------------------------------------------------------------------------
# The runtime
# ------------------------------------------------------------------------------------------------


@dataclass
class ChunkResult:
    actions: np.ndarray  # (chunk_length, action_dim) float32, robot units
    timings: dict[str, float]


def load_lerobot_policy(path: Path, device: torch.device) -> tuple[Any, Any, Any, Any]:
    """(policy config, policy, preprocessor, postprocessor) from a local directory, without the network."""
    guard_lerobot_imports()
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

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
    policy = get_policy_class(policy_config.type).from_pretrained(path, config=policy_config, local_files_only=True)
    policy.eval()
    preprocessor, postprocessor = make_pre_post_processors(
        policy_config, pretrained_path=str(path), preprocessor_overrides={"device_processor": {"device": device.type}})
    return policy_config, policy, preprocessor, postprocessor


class PolicyRuntime:
    """A loaded checkpoint serving chunks per client session."""

    def __init__(self, config: DeploymentConfig) -> None:
        self.config = config
        settings = config.policy
        self.device = resolve_device(settings.device)
        if self.device.type == "cpu" and settings.cpu_threads > 0:
            # On a shared CPU fewer threads than cores can be much faster (no oversubscription).
            torch.set_num_threads(settings.cpu_threads)
        self.path = resolve_checkpoint(config.resolve(settings.checkpoint))
        self.sidecar = read_sidecar(self.path)
        self.policy_config, self.policy, self.preprocessor, self.postprocessor = load_lerobot_policy(
            self.path, self.device)
        problems = layout_differences(self.policy_config, config, self.sidecar)
        if problems:
            raise CheckpointError(f"checkpoint {self.path} does not match the config: " + "; ".join(problems))
        self.options = SpeedOptions.from_config(settings, self.device)
        if not self.options.exact:
            torch.set_float32_matmul_precision("high")  # TF32 matmuls: the fast paths are not exact anyway
        self.cameras = {camera_name(key): [int(feature.shape[1]), int(feature.shape[2]), 3]
                        for key, feature in self.policy_config.image_features.items()}
        self.state_dim = len(config.state_names())
        self.action_dim = len(config.action_names())
        input_keys = [*self.policy_config.image_features, STATE_KEY]
        self.normaliser = Normaliser(self.preprocessor, self.postprocessor, input_keys, self.device)
        # Normalisation runs inside the model call (and its CUDA graph) when it can; else beforehand.
        prepare = self.normaliser.prepare if self.normaliser.direct else _already_prepared
        engine_type = DiffusionEngine if self.policy_config.type == "diffusion" else ChunkEngine
        self.engine: DiffusionEngine | ChunkEngine = engine_type(self.policy, self.options, prepare, input_keys)
        self.inputs = InputLoader(self.cameras, self.state_dim, self.device)
        history = getattr(self.policy_config, "n_obs_steps", 1)
        self.sessions = SessionStore(settings.max_sessions, settings.seed, history, self.device)
        self.contract = PolicyContract(
            policy_type=self.policy_config.type,
            cameras=self.cameras,
            state_names=config.state_names(),
            action_names=config.action_names(),
            chunk_length=self.engine.chunk_length,
            n_obs_steps=history,
            fps=config.fps,
            checkpoint_id=checkpoint_identity(self.path),
            checkpoint_path=str(self.path),
            untrained=bool(self.sidecar.get("untrained", False)),
            device=str(self.device),
            extra={"dtype": settings.dtype, "compile": self.options.compile, "cuda_graphs": self.options.cuda_graphs,
                   "fast_unet": self.options.fast_unet, "exact": self.options.exact, **self.engine.describe()},
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def infer(self, client: str, request: Message) -> ChunkResult:
        """One chunk for ``client``. Timings are host wall times per stage; GPU work queued in one stage
        and finished in a later one counts there (the chunk's copy to the host waits for all of it)."""
        start = time.perf_counter()
        obs = validate_request(request, self.cameras, self.state_dim)
        inputs = self.inputs.load(obs)
        decoded = time.perf_counter()
        if not self.normaliser.direct:
            inputs = self.normaliser.prepare(inputs)
        preprocessed = time.perf_counter()
        session = self.sessions.get(client)
        actions = self.engine.chunk(session, inputs)
        self._sync()
        inferred = time.perf_counter()
        chunk = self.normaliser.unnormalise(actions).reshape(-1, self.action_dim).to("cpu", torch.float32).numpy()
        finished = time.perf_counter()
        if not np.all(np.isfinite(chunk)):
            # Never pass non-finite actions on: the actuator would have to catch them.
            raise ProtocolError("action", "finite actions from the policy (the checkpoint produced NaN or inf)")
        session.requests += 1
        timings = {"decode_s": decoded - start, "preprocess_s": preprocessed - decoded,
                   "inference_s": inferred - preprocessed, "postprocess_s": finished - inferred,
                   "total_s": finished - start}
        return ChunkResult(actions=np.ascontiguousarray(chunk), timings=timings)

    def reset(self, client: str) -> None:
        self.sessions.reset(client)

    def warmup_request(self) -> Message:
        """A plausible observation (mid-range state, grey images) for warm-up passes."""
        from common.protocol import KIND_REQUEST

        lower = np.asarray(self.config.lower_limits(), dtype=np.float32)
        upper = np.asarray(self.config.upper_limits(), dtype=np.float32)
        arrays = {image_key(name): np.full(shape, 128, dtype=np.uint8) for name, shape in self.cameras.items()}
        arrays[STATE_KEY] = (lower + upper) / 2
        return Message(kind=KIND_REQUEST, meta={"op": "infer", "client": "__warmup__", "obs_t": 0.0}, arrays=arrays)

    def warmup(self, passes: int) -> list[float]:
        """Run ``passes`` chunks on a throwaway session (compiles, records graphs); returns their durations."""
        durations: list[float] = []
        request = self.warmup_request()
        for _ in range(max(0, passes)):
            durations.append(self.infer("__warmup__", request).timings["total_s"])
        self.sessions.sessions.pop("__warmup__", None)
        return durations


def _already_prepared(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return batch
