"""Everything the policy node does between a decoded request and its reply, kept out of the node loop.

``PolicyRuntime`` ties the parts together: the checkpoint (``nodes.policy.checkpoint``: resolve, check
against the config, load offline), the sessions (``nodes.policy.sessions``), the request's inputs
(``nodes.policy.io``: validate, upload or decode, normalise), the speed options (``nodes.policy.speed``)
and the chunk engine (``nodes.policy.engines``: DiffusionPolicy with per-session history, or a
single-observation chunking policy such as ACT).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common.config import DeploymentConfig
from common.wire.contract import ACTION_KEY, STAT_KINDS, STATE_KEY, PolicyContract, image_key
from common.wire.protocol import Message, ProtocolError
from nodes.policy.checkpoint import (
    CheckpointError,
    StageClock,
    camera_name,
    checkpoint_identity,
    layout_differences,
    load_lerobot_policy,
    read_sidecar,
    resolve_checkpoint,
)
from nodes.policy.engines import ChunkEngine, DiffusionEngine
from nodes.policy.io import InputLoader, Normaliser, validate_request
from nodes.policy.sessions import SessionStore
from nodes.policy.speed import SpeedOptions, use_compile_cache
from nodes.policy.vla import LANGUAGE_TYPES, WARMUP_INSTRUCTION, FlowMatchingEngine

MAX_CLIENT_ID_LEN = 128


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("policy.device: cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def checkpoint_joint_stats(preprocessor: Any, postprocessor: Any) -> dict[str, dict[str, list[float]]]:
    """The dataset statistics (min, max, mean) the checkpoint normalises state and action with, robot units.

    They come from the checkpoint's own normaliser steps (LeRobot writes its dataset's ``meta/stats.json``
    into them at training); the actuator compares them with the arms' units and limits before it moves.
    """
    found: dict[str, dict[str, list[float]]] = {}
    for pipeline, key in ((preprocessor, STATE_KEY), (postprocessor, ACTION_KEY)):
        for step in getattr(pipeline, "steps", []):
            stats = getattr(step, "stats", None)
            if isinstance(stats, dict) and isinstance(stats.get(key), dict):
                entry = stats[key]
                if all(kind in entry for kind in STAT_KINDS):
                    found[key] = {kind: [float(v) for v in np.asarray(entry[kind], dtype=np.float64).reshape(-1)]
                                  for kind in STAT_KINDS}
                break
    return found


@dataclass
class ChunkResult:
    actions: np.ndarray  # (chunk_length, action_dim) float32, robot units
    timings: dict[str, float]
    # DiffusionPolicy: the predicted rows after the chunk (guide_rows, action_dim), never executed; an rtc
    # client sends them back as soft prefix rows. (0, action_dim) for other policies.
    guide: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))


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
        # Where the start-up goes, by stage (the node logs it). The weights' hash (a second or more for a
        # 1 GB file) runs in a thread beside the LeRobot import and the load: hashlib releases the GIL.
        self.startup = StageClock()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-id") as hasher:
            identity = hasher.submit(checkpoint_identity, self.path)
            self.policy_config, self.policy, self.preprocessor, self.postprocessor = load_lerobot_policy(
                self.path, self.device, self.startup, config.resolve(settings.vlm_dir) if settings.vlm_dir else None)
            with self.startup.stage("checkpoint id wait"):
                self.checkpoint_id = identity.result()
        problems = layout_differences(self.policy_config, config, self.sidecar)
        if problems:
            raise CheckpointError(f"checkpoint {self.path} does not match the config: " + "; ".join(problems))
        self.options = SpeedOptions.from_config(settings, self.device)
        if not self.options.exact:
            torch.set_float32_matmul_precision("high")  # TF32 matmuls: the fast paths are not exact anyway
        # Set before the engines call torch.compile: a restart then reuses the generated code and kernels.
        self.compile_cache = ""
        if self.options.compile:
            cache_dir = settings.compile_cache or str(config.resolve(config.run_dir) / "compile-cache")
            self.compile_cache = use_compile_cache(config.resolve(cache_dir))
        self.cameras = {camera_name(key): [int(feature.shape[1]), int(feature.shape[2]), 3]
                        for key, feature in self.policy_config.image_features.items()}
        self.state_dim = len(config.state_names())
        self.action_dim = len(config.action_names())
        input_keys = [*self.policy_config.image_features, STATE_KEY]
        self.normaliser = Normaliser(self.preprocessor, self.postprocessor, input_keys, self.device)
        # Normalisation runs inside the model call (and its CUDA graph) when it can; else beforehand.
        prepare = self.normaliser.prepare if self.normaliser.direct else _already_prepared
        self.engine: DiffusionEngine | ChunkEngine | FlowMatchingEngine
        with self.startup.stage("engine"):
            if self.policy_config.type in LANGUAGE_TYPES:
                if settings.rows != "n_action_steps":
                    raise CheckpointError(f"policy.rows: {settings.rows!r} is for DiffusionPolicy; a "
                                          f"{self.policy_config.type} checkpoint serves n_action_steps")
                self.engine = FlowMatchingEngine(self.policy, self.preprocessor, self.options, self.device,
                                                 settings.rtc_guidance)
            elif self.policy_config.type == "diffusion":
                self.engine = DiffusionEngine(self.policy, self.options, prepare, input_keys, rows=settings.rows)
            else:
                if settings.rows != "n_action_steps":
                    raise CheckpointError(f"policy.rows: {settings.rows!r} is for DiffusionPolicy (it predicts a "
                                          f"horizon); a {self.policy_config.type} checkpoint serves n_action_steps")
                self.engine = ChunkEngine(self.policy, self.options, prepare, input_keys)
        # rtc prefixes are normalised with the checkpoint's action stats: only with LeRobot's plain pipelines.
        self.language = isinstance(self.engine, FlowMatchingEngine)
        self.rtc_max_rows = self.engine.rtc_max_rows if self.normaliser.direct or self.language else 0
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
            checkpoint_id=self.checkpoint_id,
            checkpoint_path=str(self.path),
            untrained=bool(self.sidecar.get("untrained", False)),
            device=str(self.device),
            extra={"dtype": settings.dtype, "compile": self.options.compile, "cuda_graphs": self.options.cuda_graphs,
                   "fast_unet": self.options.fast_unet, "exact": self.options.exact, **self.engine.describe(),
                   "rtc_max_prefix_rows": self.rtc_max_rows,
                   "rtc_guide_rows": self.engine.guide_rows if self.rtc_max_rows else 0,
                   "rtc_guidance": settings.rtc_guidance if self.rtc_max_rows else ""},
            stats=checkpoint_joint_stats(self.preprocessor, self.postprocessor),
            takes_instruction=self.policy_config.type in LANGUAGE_TYPES,
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def infer(self, client: str, request: Message) -> ChunkResult:
        """One chunk for ``client``. Timings are host wall times per stage; GPU work queued in one stage
        and finished in a later one counts there (the chunk's copy to the host waits for all of it)."""
        start = time.perf_counter()
        obs = validate_request(request, self.cameras, self.state_dim, action_dim=self.action_dim,
                               rtc_rows=self.rtc_max_rows, takes_instruction=self.contract.takes_instruction)
        inputs = self.inputs.load(obs)
        decoded = time.perf_counter()
        if not self.normaliser.direct:
            inputs = self.normaliser.prepare(inputs, task=obs.instruction if self.language else None)
        preprocessed = time.perf_counter()
        prefix = None if obs.rtc is None else torch.from_numpy(np.array(obs.rtc.rows, dtype=np.float32)).to(self.device)
        session = self.sessions.get(client)
        if isinstance(self.engine, FlowMatchingEngine):
            # LeRobot's real-time chunking: the prefix (robot units) and its frozen rows; its own weights
            actions = self.engine.chunk(session, inputs, None if obs.rtc is None or prefix is None
                                        else (prefix, obs.rtc.delay_rows))
        else:
            rtc = None
            if obs.rtc is not None and prefix is not None:
                weights = obs.rtc.weights(self.config.policy.rtc_guidance)
                rtc = (self.normaliser.normalise_action(prefix), torch.from_numpy(weights).to(self.device))
            actions = self.engine.chunk(session, inputs, rtc)
        self._sync()
        inferred = time.perf_counter()
        rows = self.normaliser.unnormalise(actions).reshape(-1, self.action_dim).to("cpu", torch.float32).numpy()
        chunk, guide = rows[:self.engine.chunk_length], rows[self.engine.chunk_length:]
        finished = time.perf_counter()
        if not np.all(np.isfinite(rows)):
            # Never pass non-finite actions on: the actuator would have to catch them.
            raise ProtocolError("action", "finite actions from the policy (the checkpoint produced NaN or inf)")
        session.requests += 1
        timings = {"decode_s": decoded - start, "preprocess_s": preprocessed - decoded,
                   "inference_s": inferred - preprocessed, "postprocess_s": finished - inferred,
                   "total_s": finished - start}
        return ChunkResult(actions=np.ascontiguousarray(chunk), timings=timings, guide=np.ascontiguousarray(guide))

    def reset(self, client: str) -> None:
        self.sessions.reset(client)

    def warmup_request(self) -> Message:
        """A plausible observation (mid-range state, grey images) for warm-up passes."""
        from common.wire.protocol import KIND_REQUEST

        lower = np.asarray(self.config.lower_limits(), dtype=np.float32)
        upper = np.asarray(self.config.upper_limits(), dtype=np.float32)
        arrays = {image_key(name): np.full(shape, 128, dtype=np.uint8) for name, shape in self.cameras.items()}
        arrays[STATE_KEY] = (lower + upper) / 2
        meta: dict[str, Any] = {"op": "infer", "client": "__warmup__", "obs_t": 0.0}
        if self.contract.takes_instruction:
            meta["instruction"] = WARMUP_INSTRUCTION
        return Message(kind=KIND_REQUEST, meta=meta, arrays=arrays)

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
