"""Vision-language-action policies (SmolVLA, pi0, pi0.5) through LeRobot 0.6.1's own classes and processors.

Two parts:

- **Local assets, offline.** These policies reach the Hugging Face hub in their constructors and processors:
  SmolVLA's ``AutoConfig`` / ``AutoProcessor`` for ``vlm_model_name``, and every one of them an
  ``AutoTokenizer`` in the saved preprocessor's tokenizer step (SmolVLA: ``vlm_model_name``; pi0 / pi0.5: the
  PaliGemma tokenizer, ``google/paligemma-3b-pt-224``). ``resolve_language_assets`` finds each of them on this
  machine (``policy.vlm_dir``, a directory the checkpoint names, the local Hugging Face cache) or raises
  ``LanguageAssetsMissing`` naming the files and where to put them; the node refuses with exit 2. The node
  runs with ``HF_HUB_OFFLINE=1``, so nothing can wait on the network.
- **The chunk.** ``FlowMatchingEngine`` runs LeRobot's ``predict_action_chunk`` on the batch the checkpoint's
  own saved preprocessor made (normalisation, the instruction's newline and tokenizer), with the initial
  noise drawn from the session's seeded generator, so a session replays exactly. ``overlap: rtc`` uses LeRobot's
  real-time chunking (``lerobot.policies.rtc``, Black et al. 2025): the wire's ``rtc_prefix`` (normalised with
  the checkpoint's action stats) is ``prev_chunk_left_over``, ``rtc_delay_rows`` its ``inference_delay`` and
  the prefix's length its ``execution_horizon``; the prefix guides the flow-matching steps (the frozen rows are
  followed closely, not copied exactly as DiffusionPolicy's inpainting copies them).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.wire.contract import ACTION_KEY
from nodes.policy.checkpoint import CheckpointError
from nodes.policy.sessions import Session
from nodes.policy.speed import SpeedOptions
from nodes.policy.vla_fast import FastFlowMatching

log = logging.getLogger(__name__)

# LeRobot policy types that read a task instruction (LeRobot's ``task``): their contract says takes_instruction
# and an infer request without meta.instruction is refused.
LANGUAGE_TYPES = ("smolvla", "pi0", "pi05")
# The instruction the warm-up passes use (a language policy needs one to run at all).
WARMUP_INSTRUCTION = "pick up the cube"
# LeRobot's registry name of its tokenizer step in a saved preprocessor (policy_preprocessor.json).
TOKENIZER_STEP = "tokenizer_processor"
TOKENIZER_FILES = "tokenizer_config.json with tokenizer.json (or tokenizer.model)"
VLM_FILES = "config.json, processor_config.json (or preprocessor_config.json), " + TOKENIZER_FILES


class LanguageAssetsMissing(CheckpointError):
    """A VLM config or tokenizer that is not on this machine (the node never downloads one)."""


@dataclass
class LanguageAssets:
    tokenizer: str  # directory the preprocessor's tokenizer step loads from
    vlm: str = ""  # SmolVLA: directory for vlm_model_name (AutoConfig, AutoProcessor)


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() and (
        (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file())


def has_vlm(folder: Path) -> bool:
    return (folder / "config.json").is_file() and has_tokenizer(folder) and (
        (folder / "processor_config.json").is_file() or (folder / "preprocessor_config.json").is_file())


def hub_cache_dir() -> str:
    """The Hugging Face hub cache this process reads, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hub_cache_snapshot(name: str) -> Path | None:
    """The local Hugging Face cache's snapshot of the hub repo ``name`` (never the network)."""
    if name.count("/") != 1 or name.startswith(("/", ".")):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=name, local_files_only=True, cache_dir=hub_cache_dir()))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None


def find_local(name: str, vlm_dir: Path | None, complete: Any,
               checkpoint: Path | None = None) -> tuple[Path | None, list[str]]:
    """The first folder holding ``name``'s files (``complete(folder)``): ``<vlm_dir>/<name>``, ``vlm_dir`` itself,
    ``name`` as a directory, the folder of that name inside ``checkpoint`` (a checkpoint the maker wrote names its
    own ``vlm/`` or ``tokenizer/`` by absolute path, which is elsewhere once it is copied to another machine), the
    Hugging Face cache. Also the places looked at, for the refusal."""
    candidates: list[tuple[str, Path | None]] = []
    if vlm_dir is not None:
        candidates += [(f"policy.vlm_dir/{name}", vlm_dir / name), ("policy.vlm_dir", vlm_dir)]
    if name.startswith("/") or Path(name).is_dir():
        candidates.append(("the checkpoint's path", Path(name)))
    if name.startswith("/") and checkpoint is not None:
        candidates.append(("that folder in the checkpoint", checkpoint / Path(name).name))
    tried: list[str] = []
    for label, folder in candidates:
        if folder is not None and folder.is_dir() and complete(folder):
            return folder, tried
        tried.append(f"{label} ({folder})")
    cached = _hub_cache_snapshot(name)
    if cached is not None and complete(cached):
        return cached, tried
    tried.append(f"the Hugging Face cache ({hub_cache_dir()}{'' if cached is None else ': incomplete snapshot'})")
    return None, tried


def saved_tokenizer_name(path: Path) -> str:
    """The tokenizer the checkpoint's saved preprocessor loads ("" when it has no tokenizer step)."""
    try:
        steps = json.loads((path / "policy_preprocessor.json").read_text()).get("steps", [])
    except (OSError, ValueError, AttributeError):
        return ""
    for step in steps if isinstance(steps, list) else []:
        if isinstance(step, dict) and step.get("registry_name") == TOKENIZER_STEP:
            name = (step.get("config") or {}).get("tokenizer_name")
            return name if isinstance(name, str) else ""
    return ""


def resolve_language_assets(policy_type: str, path: Path, policy_config: Any, vlm_dir: Path | None) -> LanguageAssets:
    """Where this checkpoint's VLM config and tokenizer are on this machine; ``LanguageAssetsMissing`` otherwise."""
    def refuse(what: str, name: str, files: str, tried: list[str]) -> LanguageAssetsMissing:
        return LanguageAssetsMissing(
            f"{policy_type} needs {what} '{name}' ({files}) and nothing is downloaded at run time; not found in "
            f"{'; '.join(tried)}. Put the files in a folder and name it policy.vlm_dir (the files themselves, or "
            f"<vlm_dir>/{name}/), or fill the local Hugging Face cache on a machine with network (`hf download "
            f"{name} --exclude '*.safetensors'`) and copy the cache over (docs/nodes/policy.md)")

    vlm = ""
    if policy_type == "smolvla":
        name = str(policy_config.vlm_model_name)
        found, tried = find_local(name, vlm_dir, has_vlm, path)
        if found is None:
            raise refuse("the config, processor and tokenizer of its VLM", name, VLM_FILES, tried)
        vlm = str(found)
    tokenizer_name = saved_tokenizer_name(path)
    if not tokenizer_name:
        raise CheckpointError(f"{path / 'policy_preprocessor.json'}: a {policy_type} checkpoint's preprocessor needs "
                              f"its '{TOKENIZER_STEP}' step with a tokenizer_name (LeRobot's saved pipeline)")
    if vlm and tokenizer_name == name:
        return LanguageAssets(tokenizer=vlm, vlm=vlm)
    found, tried = find_local(tokenizer_name, vlm_dir, has_tokenizer, path)
    if found is None:
        raise refuse("the tokenizer", tokenizer_name, TOKENIZER_FILES, tried)
    return LanguageAssets(tokenizer=str(found), vlm=vlm)


def apply_assets(policy_config: Any, assets: LanguageAssets, overrides: dict[str, Any]) -> None:
    """Point the config and the preprocessor's tokenizer step at the local files. SmolVLA builds its VLM from the
    config alone: the weights are in model.safetensors (``load_vlm_weights`` would fetch the VLM's own)."""
    if assets.vlm:
        policy_config.vlm_model_name = assets.vlm
        policy_config.load_vlm_weights = False
    overrides[TOKENIZER_STEP] = {"tokenizer_name": assets.tokenizer}


def action_normaliser(preprocessor: Any, device: torch.device) -> Any | None:
    """The checkpoint's own normalisation of the action (its preprocessor's stats), for rtc prefixes."""
    from nodes.policy.io import _feature_transform, _find_step

    normalizer = _find_step(preprocessor, "NormalizerProcessorStep")
    return _feature_transform(normalizer, ACTION_KEY, device) if normalizer is not None else None


class FlowMatchingEngine:
    """SmolVLA, pi0, pi0.5: one chunk per request from LeRobot's ``predict_action_chunk`` (LeRobot's plain path),
    or, with any speed option, the same call made fast by ``nodes.policy.vla_fast``; with the session's seeded
    noise and, under rtc, LeRobot's real-time chunking."""

    def __init__(self, policy: Any, preprocessor: Any, options: SpeedOptions, device: torch.device,
                 rtc_guidance: str) -> None:
        self.policy = policy
        self.config = policy.config
        self.device = device
        if getattr(self.config, "n_obs_steps", 1) != 1:
            raise CheckpointError(f"{self.config.type}: n_obs_steps={self.config.n_obs_steps} is not supported")
        self.chunk_size = int(self.config.chunk_size)
        self.n_action_steps = int(self.config.n_action_steps)
        self.noise_shape = (1, self.chunk_size, int(self.config.max_action_dim))
        # rtc: LeRobot's prefix guidance needs the prefix in the model's normalised action space, which the
        # checkpoint's stats give; not with relative actions (pi0's use_relative_actions: the prefix would have to
        # be made relative to a state that is not the one it was executed from).
        self.normalise_action = action_normaliser(preprocessor, device)
        relative = bool(getattr(self.config, "use_relative_actions", False))
        supports = bool(getattr(policy, "supports_rtc", lambda: False)()) or hasattr(policy, "init_rtc_processor")
        self.rtc_max_rows = self.chunk_size if supports and self.normalise_action is not None and not relative else 0
        if self.rtc_max_rows:
            from lerobot.configs import RTCAttentionSchedule
            from lerobot.policies.rtc.configuration_rtc import RTCConfig

            schedule = RTCAttentionSchedule.EXP if rtc_guidance == "exp" else RTCAttentionSchedule.LINEAR
            self.config.rtc_config = RTCConfig(enabled=True, prefix_attention_schedule=schedule,
                                               execution_horizon=self.chunk_size)
            policy.init_rtc_processor()  # without a prefix the guidance is skipped: the plain path exactly
        self.guide_rows = self.chunk_size - self.n_action_steps if self.rtc_max_rows else 0
        # Any speed option selects the fast path (nodes.policy.vla_fast): bf16, CUDA graphs, rtc in the graph.
        self.fast: FastFlowMatching | None = None
        if options.cuda_graphs or options.compile or options.fast_unet or not options.exact:
            self.fast = FastFlowMatching(policy, options, device, rtc=bool(self.rtc_max_rows))

    @property
    def chunk_length(self) -> int:
        return self.n_action_steps

    def draw_noise(self, session: Session) -> Tensor:
        return torch.randn(self.noise_shape, dtype=torch.float32, device=self.device, generator=session.generator)

    def chunk(self, session: Session, batch: dict[str, Tensor], rtc: tuple[Tensor, int] | None = None) -> Tensor:
        """(1, chunk_size, action_dim) normalised actions for the preprocessed ``batch``; ``rtc``: the prefix in
        robot units (rows, action_dim) and its frozen rows."""
        noise = self.draw_noise(session)
        kwargs: dict[str, Any] = {}
        if rtc is not None:
            if not self.rtc_max_rows:
                raise ValueError(f"rtc is not available for this {self.config.type} checkpoint")
            prefix, delay = rtc
            kwargs = {"prev_chunk_left_over": self.normalise_action.normalise(prefix).unsqueeze(0),
                      "inference_delay": int(delay), "execution_horizon": int(prefix.shape[0])}
        if self.fast is not None:
            return self.fast.chunk(batch, noise, None if rtc is None else (
                kwargs["prev_chunk_left_over"], kwargs["inference_delay"], kwargs["execution_horizon"]))
        return self.policy.predict_action_chunk(batch, noise=noise, **kwargs).float()

    @property
    def batches(self) -> bool:
        """Whether requests of different sessions can share one call: LeRobot's plain path takes a batch (one
        noise row and one instruction per row); the fast path's CUDA graphs are recorded for one row."""
        return self.fast is None

    def chunk_batch(self, sessions: list[Session], batch: dict[str, Tensor],
                    rtcs: list[tuple[Tensor, int] | None]) -> Tensor:
        """(B, chunk_size, action_dim) normalised actions, row i for session i (``batch`` preprocessed with one
        instruction per row): each row's noise from its own session's generator, as it is drawn alone, so a row
        is the chunk the session gets alone up to the rounding of batched kernels. LeRobot's real-time chunking
        takes one prefix, delay and horizon per call: a batch holding an rtc request runs its rows one by one."""
        if len(sessions) == 1:
            return self.chunk(sessions[0], batch, rtcs[0])
        if any(rtc is not None for rtc in rtcs):
            return torch.cat([self.chunk(session, {key: value[row:row + 1] for key, value in batch.items()}, rtc)
                              for row, (session, rtc) in enumerate(zip(sessions, rtcs, strict=True))])
        if not self.batches:
            raise ValueError("the fast path runs one request at a time")
        noise = torch.cat([self.draw_noise(session) for session in sessions])
        return self.policy.predict_action_chunk(batch, noise=noise).float()

    def describe(self) -> dict[str, Any]:
        steps = getattr(self.config, "num_steps", 0) or getattr(self.config, "num_inference_steps", 0)
        return {"rows": "n_action_steps", "chunk_size": self.chunk_size, "num_steps": int(steps),
                "rtc_max_prefix_rows": self.rtc_max_rows, **(self.fast.describe() if self.fast else {})}
