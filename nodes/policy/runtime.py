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
from nodes.policy.io import InputLoader, Normaliser, Observation, validate_request
from nodes.policy.sessions import Session, SessionStore
from nodes.policy.speed import BATCH_BUCKETS, SpeedOptions, use_compile_cache
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
    batch_size: int = 1  # the requests that ran in the same model call as this one


@dataclass
class BatchItem:
    """One checked ``infer`` request on its way into a batch."""

    client: str
    obs: Observation
    checked_s: float = 0.0  # validating it (and, on a CPU, decoding its JPEG images): the socket thread's part
    queued_s: float = 0.0  # waiting for the model (a batch to start)


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
        # Cross-session batching (nodes.policy.batching). The language policies batch on LeRobot's plain path (one
        # instruction and one noise row per row); their fast path (nodes.policy.vla_fast) runs one at a time.
        batches = not isinstance(self.engine, FlowMatchingEngine) or self.engine.batches
        self.max_batch = max(1, settings.max_batch) if batches else 1
        self.inputs = InputLoader(self.cameras, self.state_dim, self.device, self.max_batch)
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

    def check(self, request: Message) -> Observation:
        """An ``infer`` request's observation, checked against the contract (``ProtocolError`` naming the field);
        on a CPU device its JPEG images are decoded here too. The node runs this on its socket thread, so a
        slow or bad request never holds up a batch."""
        obs = validate_request(request, self.cameras, self.state_dim, action_dim=self.action_dim,
                               rtc_rows=self.rtc_max_rows, takes_instruction=self.contract.takes_instruction)
        self.inputs.decode_on_host(obs)
        return obs

    @torch.no_grad()
    def infer(self, client: str, request: Message) -> ChunkResult:
        """One chunk for ``client``: ``check`` then a batch of one. Raises what the request failed with."""
        start = time.perf_counter()
        obs = self.check(request)
        result = self.infer_batch([BatchItem(client, obs, checked_s=time.perf_counter() - start)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    @torch.no_grad()
    def infer_batch(self, items: list[BatchItem]) -> list[ChunkResult | Exception]:
        """One chunk per item, each session at most once, in one model call: result i is item i's chunk, or the
        exception its request failed with (errors are per request: when the batch as a whole fails, each item
        is run again alone from the session state it had, so only the request that fails gets the error)."""
        if len(items) > self.max_batch:
            raise ValueError(f"a batch of at most {self.max_batch} requests, got {len(items)}")
        sessions = [self.sessions.get(item.client) for item in items]
        saved = [session.generator.get_state() for session in sessions]
        try:
            return self._run_batch(items, sessions)
        except Exception as exc:
            for session, state in zip(sessions, saved, strict=True):  # the noise drawn for the failed batch
                session.generator.set_state(state)
            if len(items) == 1:
                return [exc]
        return [self.infer_batch([item])[0] for item in items]

    def _run_batch(self, items: list[BatchItem], sessions: list[Session]) -> list[ChunkResult | Exception]:
        """Timings are host wall times per stage; GPU work queued in one stage and finished in a later one
        counts there (the chunk's copy to the host waits for all of it). The batch's stages are shared by its
        requests; each request adds its own check and queue wait."""
        start = time.perf_counter()
        inputs = self.inputs.load_batch([item.obs for item in items])
        decoded = time.perf_counter()
        if not self.normaliser.direct:
            # A language policy's instruction per row (LeRobot's tokenizer step pads each to its max length).
            task: str | list[str] | None = None
            if self.language:
                instructions = [item.obs.instruction or "" for item in items]
                task = instructions[0] if len(items) == 1 else instructions
            inputs = self.normaliser.prepare(inputs, task=task)
        preprocessed = time.perf_counter()
        prefixes = [None if item.obs.rtc is None else
                    torch.from_numpy(np.array(item.obs.rtc.rows, dtype=np.float32)).to(self.device) for item in items]
        if isinstance(self.engine, FlowMatchingEngine):
            # LeRobot's real-time chunking: the prefix (robot units) and its frozen rows; its own weights
            actions = self.engine.chunk_batch(sessions, inputs, [
                None if item.obs.rtc is None or prefix is None else (prefix, item.obs.rtc.delay_rows)
                for item, prefix in zip(items, prefixes, strict=True)])
        else:
            rtcs: list[tuple[Tensor, Tensor] | None] = []
            for item, prefix in zip(items, prefixes, strict=True):
                if item.obs.rtc is None or prefix is None:
                    rtcs.append(None)
                    continue
                weights = item.obs.rtc.weights(self.config.policy.rtc_guidance)
                rtcs.append((self.normaliser.normalise_action(prefix), torch.from_numpy(weights).to(self.device)))
            actions = self.engine.chunk_batch(sessions, inputs, rtcs)
        self._sync()
        inferred = time.perf_counter()
        rows = self.normaliser.unnormalise(actions).reshape(len(items), -1, self.action_dim).to(
            "cpu", torch.float32).numpy()
        finished = time.perf_counter()
        shared = {"preprocess_s": preprocessed - decoded, "inference_s": inferred - preprocessed,
                  "postprocess_s": finished - inferred}
        results: list[ChunkResult | Exception] = []
        for item, session, item_rows in zip(items, sessions, rows, strict=True):
            if not np.all(np.isfinite(item_rows)):
                # Never pass non-finite actions on: the actuator would have to catch them.
                results.append(ProtocolError("action", "finite actions from the policy (the checkpoint produced "
                                             "NaN or inf)"))
                continue
            session.requests += 1
            decode_s = item.checked_s + (decoded - start)
            timings = {"decode_s": decode_s, "queue_s": item.queued_s, **shared,
                       "total_s": item.checked_s + item.queued_s + (finished - start)}
            chunk, guide = item_rows[:self.engine.chunk_length], item_rows[self.engine.chunk_length:]
            results.append(ChunkResult(actions=np.ascontiguousarray(chunk), timings=timings,
                                       guide=np.ascontiguousarray(guide), batch_size=len(items)))
        return results

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
        """Run ``passes`` chunks on a throwaway session (compiles, records graphs); returns their durations.
        With CUDA graphs or torch.compile, one batch of each batch-size bucket up to ``max_batch`` follows, so
        every bucket's graph is recorded (and compiled) before the node reports ready."""
        durations: list[float] = []
        request = self.warmup_request()
        for _ in range(max(0, passes)):
            durations.append(self.infer("__warmup__", request).timings["total_s"])
        if passes > 0 and self.max_batch > 1 and (self.options.cuda_graphs or self.options.compile):
            obs = self.check(request)
            for bucket in BATCH_BUCKETS:
                if 1 < bucket <= self.max_batch:
                    items = [BatchItem(f"__warmup__{row}", obs) for row in range(bucket)]
                    for result in self.infer_batch(items):
                        if isinstance(result, Exception):
                            raise result
        for client in list(self.sessions.sessions):
            if client.startswith("__warmup__"):
                self.sessions.sessions.pop(client, None)
        return durations


def _already_prepared(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return batch
