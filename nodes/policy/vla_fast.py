"""The fast path of the flow-matching VLAs (SmolVLA, pi0, pi0.5): LeRobot's own ``predict_action_chunk``, made
replayable as one CUDA graph per instruction-length bucket.

What runs is LeRobot's code and weights, unchanged: the images resized and scaled on the GPU from the frames the
node uploaded (LeRobot's ``resize_with_pad``), the vision encoder and the VLM over the prefix once, its key/value
cache, then ``num_steps`` Euler steps of the action expert against that cache (``euler_integrate`` /
``denoise_step``). The engine adds four things around it:

- **bf16** (``policy.dtype: bf16``): the model's own bf16 layout (pi0 / pi0.5: LeRobot's
  ``to_bfloat16_for_selected_params``, which keeps the vision tower and the norms in fp32; SmolVLA: the VLM and
  its expert in bf16, as LeRobot loads a pretrained SmolVLM).
- **Static shapes.** The instruction's tokens are padded (or, in bf16, trimmed) to a bucket of ``TOKEN_BUCKETS``
  (padding is masked out of attention and does not move position ids, so the chunk is the same), so one graph per
  bucket serves every instruction; all buckets are recorded on the first call (the node's warm-up).
- **One CUDA graph** (``policy.cuda_graphs``) per bucket holding the whole request: prefix, KV cache (it lives in
  the graph's memory on the GPU) and the denoising loop; a replay does no host work. LeRobot
  builds a few constant tensors from Python lists on every call (attention-mask patterns, the step's time), a
  host-to-device copy that a capture cannot hold: ``HostConstants`` serves each of them from a device copy made
  on the first (eager) call, by value. SmolVLA's image encoder syncs with the host (a boolean-mask write):
  ``without_host_syncs`` replaces that forward on the loaded model. The captured call's freedom from host syncs is
  checked on the CPU (tests/test_vla_fast.py: no op that reads a device value back, bool-mask indexing included)
  and by the CUDA-only test under ``torch.cuda.set_sync_debug_mode("error")``, not yet run on a GPU. The buckets'
  graphs share one memory pool (``speed.GraphPool``): they replay one at a time and each output is cloned.
- **RTC inside the graph.** LeRobot's ``RTCProcessor.denoise_step`` computes its correction with autograd, which
  here reduces to the weighted error itself (``x1 = x - t * v`` with ``v`` computed before ``x`` needs a
  gradient, so ``d x1 / d x`` is the identity): ``GraphRTC`` computes ``v - w_g(t) * (prefix - (x - t v)) * w``
  with the same expressions, the prefix (padded to the chunk, normalised) and the per-row weights (LeRobot's
  ``get_prefix_weights``) being graph inputs. Without a prefix the weights are 0 and the result is ``v`` exactly.

``exact`` (fp32, ``policy.cuda_graphs`` only): the same kernels as LeRobot's plain path, replayed; tokens are only
padded, never trimmed, so a pi0 / pi0.5 request has LeRobot's shapes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from nodes.policy.checkpoint import CheckpointError
from nodes.policy.speed import GraphPool, MaybeGraphed, SpeedOptions

log = logging.getLogger(__name__)

TOKENS_KEY = "observation.language.tokens"
MASK_KEY = "observation.language.attention_mask"
# Instruction lengths (tokens) that get a graph of their own; the checkpoint's tokenizer_max_length caps them.
TOKEN_BUCKETS = (16, 32, 48, 64, 96, 128, 200, 256, 512)
MAX_CONSTANT_ELEMENTS = 1 << 16  # larger host tensors moved to the device are not cached (none are constant)
MAX_CONSTANTS = 4096  # a bound on the cache, should a model ever move varying host data to the device


class _NotConstant(Exception):
    pass


def _frozen(data: Any) -> Any:
    """``data`` as a hashable key if it is plain Python numbers (nested lists / tuples); else ``_NotConstant``
    (a tensor inside a list hashes by identity, not by value: never a cache key)."""
    if isinstance(data, (list, tuple)):
        return tuple(_frozen(item) for item in data)
    if isinstance(data, (bool, int, float)):
        return (type(data).__name__, data)
    raise _NotConstant


class HostConstants(TorchFunctionMode):
    """Host-made constants served from a cache of device tensors, keyed by value, dtype and device.

    LeRobot's VLAs (and transformers inside them) build small constant tensors on the host on every call:
    ``torch.tensor(<python list or float>, device=...)`` (attention-mask patterns, the step's time) and small host
    tensors moved with ``.to(device)`` (transformers' all-ones patch mask). On CUDA each is a host-to-device copy
    and a sync, which a CUDA graph capture refuses. The first call, eager, fills the cache; later calls, the capture
    among them, get the same device tensor. Only plain Python data and host tensors of at most
    ``MAX_CONSTANT_ELEMENTS`` are served, never anything the request carries (that is on the device already), and
    nothing writes into them. ``misses`` counts the tensors made rather than served: none on a warm call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cache: dict[tuple[Any, ...], Tensor] = {}
        self.misses = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        key: tuple[Any, ...] | None = None
        if func is torch.tensor and args and not kwargs.get("requires_grad"):
            try:
                key = ("tensor", _frozen(args[0]), kwargs.get("dtype"), str(kwargs.get("device")), len(args))
            except _NotConstant:
                key = None
        elif func is Tensor.to and args and isinstance(args[0], Tensor) and args[0].device.type == "cpu":
            # A small host tensor moved to the device (e.g. transformers' all-ones patch mask): keyed by its values.
            source = args[0]
            device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            if device is not None and device.type != "cpu" and source.numel() <= MAX_CONSTANT_ELEMENTS:
                values = source.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                key = ("to", source.dtype, tuple(source.shape), values, str(device), dtype)
        if key is None:
            return func(*args, **kwargs)
        cached = self.cache.get(key)
        if cached is None:
            self.misses += 1
            cached = func(*args, **kwargs)
            if len(self.cache) < MAX_CONSTANTS:
                self.cache[key] = cached
        return cached


class GraphRTC:
    """LeRobot's real-time-chunking guidance (``RTCProcessor.denoise_step``) in a form a CUDA graph holds.

    Plugged into the policy as its ``rtc_processor``: LeRobot's ``euler_integrate`` calls ``denoise_step`` for every
    step. The prefix and the weights are the tensors ``bind`` was given (the graph's static inputs); the guidance
    weight of each step is computed once per ``time`` with LeRobot's expressions (float32, on the CPU as LeRobot
    does) and kept on the device.
    """

    def __init__(self, rtc_config: Any, device: torch.device) -> None:
        self.rtc_config = rtc_config
        self.device = device
        self.prefix: Tensor | None = None
        self.weights: Tensor | None = None
        self._guidance: dict[float, Tensor] = {}
        self.tracker = None

    def bind(self, prefix: Tensor, weights: Tensor) -> None:
        self.prefix, self.weights = prefix, weights

    def guidance_weight(self, time: float) -> Tensor:
        found = self._guidance.get(time)
        if found is None:
            max_guidance_weight = torch.as_tensor(self.rtc_config.max_guidance_weight)
            tau_tensor = torch.as_tensor(1 - time)
            squared_one_minus_tau = (1 - tau_tensor) ** 2
            inv_r2 = (squared_one_minus_tau + tau_tensor**2) / (squared_one_minus_tau)
            c = torch.nan_to_num((1 - tau_tensor) / tau_tensor, posinf=max_guidance_weight)
            guidance_weight = torch.nan_to_num(c * inv_r2, posinf=max_guidance_weight)
            found = self._guidance[time] = torch.minimum(guidance_weight, max_guidance_weight).to(self.device)
        return found

    def denoise_step(self, x_t: Tensor, prev_chunk_left_over: Any, inference_delay: Any, time: float,
                     original_denoise_step_partial: Any, execution_horizon: Any = None) -> Tensor:
        v_t = original_denoise_step_partial(x_t)
        if self.prefix is None or self.weights is None:
            return v_t
        x1_t = x_t - time * v_t
        correction = (self.prefix - x1_t) * self.weights
        return v_t - self.guidance_weight(time) * correction

    def is_debug_enabled(self) -> bool:
        return False

    def track(self, *args: Any, **kwargs: Any) -> None:
        return None


def sync_free_patch_positions(embeddings: Any, pixel_values: Tensor, patch_attention_mask: Tensor) -> Tensor:
    """transformers' ``SmolVLMVisionEmbeddings.forward`` (5.5.4) with its one host sync removed.

    The original writes the patches' position ids with boolean-mask indexing
    (``position_ids[mask] = pos_ids[mask]``), which on CUDA counts the mask on the host: a device-to-host sync that a
    CUDA graph capture refuses. Both sides have the mask's shape, so ``torch.where(mask, pos_ids, position_ids)``
    is the same tensor for any mask (LeRobot's SmolVLA always passes an all-ones mask); everything else is the
    original's code. tests/test_vla_fast.py checks it against the original forward.
    """
    batch_size, _, max_im_h, max_im_w = pixel_values.shape
    patch_embeds = embeddings.patch_embedding(pixel_values)
    out = patch_embeds.flatten(2).transpose(1, 2)
    max_nb_patches_h, max_nb_patches_w = max_im_h // embeddings.patch_size, max_im_w // embeddings.patch_size
    per_side = embeddings.num_patches_per_side
    boundaries = torch.arange(1 / per_side, 1.0, 1 / per_side, device=pixel_values.device)
    position_ids = torch.full(size=(batch_size, max_nb_patches_h * max_nb_patches_w), fill_value=0,
                              device=pixel_values.device)
    step_h = 1.0 / patch_attention_mask[:, :, 0].sum(dim=1)
    step_w = 1.0 / patch_attention_mask[:, 0, :].sum(dim=1)
    h_indices = torch.arange(patch_attention_mask.size(1), device=position_ids.device, dtype=torch.float32)
    w_indices = torch.arange(patch_attention_mask.size(2), device=position_ids.device, dtype=torch.float32)
    coords_h = torch.clamp(h_indices[None, :] * step_h[:, None], max=(1.0 - 1e-6)).to(pixel_values.dtype)
    coords_w = torch.clamp(w_indices[None, :] * step_w[:, None], max=(1.0 - 1e-6)).to(pixel_values.dtype)
    bucket_h = torch.bucketize(coords_h, boundaries, right=True)
    bucket_w = torch.bucketize(coords_w, boundaries, right=True)
    pos_ids = (bucket_h[:, :, None] * per_side + bucket_w[:, None, :]).reshape(batch_size, -1)
    position_ids = torch.where(patch_attention_mask.view(batch_size, -1), pos_ids, position_ids)
    return out + embeddings.position_embedding(position_ids)


def without_host_syncs(policy: Any) -> int:
    """Replace, on this loaded model only, the forward of each SmolVLM vision embedding by
    ``sync_free_patch_positions`` (the same result, no host sync); returns how many were replaced."""
    count = 0
    for module in policy.modules():
        if type(module).__name__ == "SmolVLMVisionEmbeddings":
            module.forward = functools.partial(sync_free_patch_positions, module)
            count += 1
    return count


def to_bf16(policy: Any) -> None:
    """The model's bf16 layout: LeRobot's own for pi0 / pi0.5, the whole VLM with its expert for SmolVLA
    (``to_fp32`` undoes it)."""
    model = policy.model
    if hasattr(model, "paligemma_with_expert"):
        model.paligemma_with_expert.to_bfloat16_for_selected_params("bfloat16")
    elif hasattr(model, "vlm_with_expert"):
        model.vlm_with_expert.to(dtype=torch.bfloat16)
    else:
        raise CheckpointError(f"policy.dtype bf16: no bf16 layout known for a {policy.config.type} model")


def to_fp32(policy: Any) -> None:
    """LeRobot's fp32 path for a VLA whose weights are (partly) bf16 (``to_bf16``, or a checkpoint saved so): pi0 /
    pi0.5 with LeRobot's own ``to_bfloat16_for_selected_params("float32")``, SmolVLA cast whole; bf16 -> fp32 is
    exact. bench/vla_gpu.py compares the fast paths against it."""
    model = policy.model
    if hasattr(model, "paligemma_with_expert"):
        model.paligemma_with_expert.to_bfloat16_for_selected_params("float32")
    else:
        policy.to(dtype=torch.float32)


def token_buckets(max_length: int) -> list[int]:
    """The token lengths that get a graph: ``TOKEN_BUCKETS`` below the tokenizer's limit, and the limit."""
    return [bucket for bucket in TOKEN_BUCKETS if bucket < max_length] + [max_length]


class FastFlowMatching:
    """One chunk per request from LeRobot's ``predict_action_chunk``, bf16 and/or CUDA-graphed (module docstring)."""

    def __init__(self, policy: Any, options: SpeedOptions, device: torch.device, rtc: bool,
                 host_constants: bool | None = None) -> None:
        self.policy = policy
        self.config = policy.config
        self.device = device
        self.options = options
        if options.compile or options.fast_unet:
            raise CheckpointError(f"policy.compile / fast_unet: not used by a {self.config.type} policy (its fast "
                                  "path is policy.dtype bf16 with policy.cuda_graphs); leave them off")
        self.bf16 = options.dtype == torch.bfloat16
        if self.bf16:
            to_bf16(policy)
        if getattr(self.config, "adapt_to_pi_aloha", False):
            raise CheckpointError("adapt_to_pi_aloha: the fast path keeps no per-call state edits; serve this "
                                  "checkpoint with policy.dtype fp32 and cuda_graphs off")
        # SmolVLA's image encoder (transformers' SmolVLMVisionEmbeddings) syncs with the host on every call.
        without_host_syncs(policy)
        self.chunk_size = int(self.config.chunk_size)
        self.action_dim = int(self.config.max_action_dim)
        self.max_tokens = int(self.config.tokenizer_max_length)
        self.buckets = token_buckets(self.max_tokens)
        # Trim the tokenizer's padding only where the result need not replay LeRobot's shapes.
        self.trim = not options.exact
        self.constants = HostConstants()
        # Only a capture needs the constants served (eagerly the mode would only add Python work to every op);
        # ``host_constants`` forces it, e.g. to check a call's capture-safety on the CPU.
        self.use_constants = options.cuda_graphs if host_constants is None else host_constants
        self.rtc: GraphRTC | None = None
        if rtc:
            from lerobot.policies.rtc.modeling_rtc import RTCProcessor

            self.rtc = GraphRTC(self.config.rtc_config, device)
            self.weights_of = RTCProcessor(self.config.rtc_config).get_prefix_weights
            policy.model.rtc_processor = self.rtc
        self.graphs = options.cuda_graphs
        # The buckets replay one at a time (one request after another, one thread) and each output is cloned at
        # once: one memory pool for all of them, not one KV cache and activations per bucket.
        self.pool = GraphPool()
        self.runs: dict[int, MaybeGraphed] = {}
        self.keys: list[str] = []
        self.recorded = False

    # ------------------------------------------------------------------ inputs
    def bucket_for(self, length: int) -> int:
        return next((bucket for bucket in self.buckets if bucket >= length), length)

    def fit_tokens(self, tokens: Tensor, mask: Tensor, bucket: int) -> tuple[Tensor, Tensor]:
        """The (right-padded) tokens and mask padded with masked zeros, or cut, to ``bucket`` columns."""
        length = tokens.shape[1]
        if bucket < length:
            return tokens[:, :bucket], mask[:, :bucket]
        if bucket > length:
            pad = bucket - length
            tokens = torch.nn.functional.pad(tokens, (0, pad), value=0)
            mask = torch.nn.functional.pad(mask, (0, pad), value=False)
        return tokens, mask

    def rtc_inputs(self, rtc: tuple[Tensor, int, int] | None) -> tuple[Tensor, Tensor]:
        """The prefix (1, chunk, max_action_dim), zero-padded as LeRobot pads it, and the per-row weights
        (1, chunk, 1) of LeRobot's schedule; all zero without a prefix (the plain chunk exactly)."""
        prefix = torch.zeros((1, self.chunk_size, self.action_dim), dtype=torch.float32, device=self.device)
        weights = torch.zeros((1, self.chunk_size, 1), dtype=torch.float32, device=self.device)
        if rtc is None:
            return prefix, weights
        rows, delay, horizon = rtc
        count, dim = rows.shape[-2], rows.shape[-1]
        prefix[0, :count, :dim] = rows.reshape(count, dim).to(torch.float32)
        horizon = min(int(horizon), count)
        weights[0, :, 0] = self.weights_of(int(delay), horizon, self.chunk_size).to(self.device)
        return prefix, weights

    # ------------------------------------------------------------------ the model call
    def _run(self, *tensors: Tensor) -> Tensor:
        count = len(self.keys)
        batch = dict(zip(self.keys, tensors[:count], strict=True))
        noise, prefix, weights = tensors[count:]
        kwargs: dict[str, Any] = {}
        if self.rtc is not None:
            self.rtc.bind(prefix, weights)
            # Any prefix routes euler_integrate through GraphRTC, which reads the bound inputs.
            kwargs = {"prev_chunk_left_over": prefix, "inference_delay": 0, "execution_horizon": self.chunk_size}
        with self.constants if self.use_constants else contextlib.nullcontext():
            return self.policy.predict_action_chunk(batch, noise=noise, **kwargs).float()

    def _graph(self, bucket: int) -> MaybeGraphed:
        run = self.runs.get(bucket)
        if run is None:
            run = self.runs[bucket] = MaybeGraphed(self._run, f"{self.config.type} chunk ({bucket} tokens)",
                                                   self.graphs, self.pool)
        return run

    def _record_all(self, inputs: list[Tensor], token_index: int) -> None:
        """Record every bucket's graph (the first call: the node's warm-up pays it, not a robot)."""
        tokens, mask = inputs[token_index], inputs[token_index + 1]
        # Without trimming, a bucket below the tokenizer's fixed padding (pi0 / pi0.5: max_length) is never used.
        for bucket in self.buckets if self.trim else [b for b in self.buckets if b >= tokens.shape[1]]:
            fitted, fitted_mask = self.fit_tokens(tokens, mask, bucket)
            fitted_mask = torch.ones_like(fitted_mask) if bucket < tokens.shape[1] else fitted_mask
            args = list(inputs)
            args[token_index], args[token_index + 1] = fitted, fitted_mask
            self._graph(bucket)(*args)
        self.recorded = True

    @torch.no_grad()
    def chunk(self, batch: dict[str, Tensor], noise: Tensor, rtc: tuple[Tensor, int, int] | None = None) -> Tensor:
        """(1, chunk_size, action_dim) normalised actions for LeRobot's preprocessed ``batch`` (batch of one);
        ``rtc``: (normalised prefix rows, frozen rows, execution horizon)."""
        if not self.keys:
            self.keys = [*sorted(key for key in batch if key not in (TOKENS_KEY, MASK_KEY)), TOKENS_KEY, MASK_KEY]
        tokens, mask = batch[TOKENS_KEY], batch[MASK_KEY]
        # The instruction's real length: one small read before the graph (the tokenizer pads on the right).
        length = int(mask.sum()) if mask.shape[1] else 0
        bucket = self.bucket_for(length)
        if not self.trim:
            bucket = max(bucket, tokens.shape[1])
        tokens, mask = self.fit_tokens(tokens, mask, bucket)
        prefix, weights = self.rtc_inputs(rtc)
        inputs = [batch[key] for key in self.keys[:-2]] + [tokens, mask, noise, prefix, weights]
        if self.graphs and not self.recorded:
            self._record_all(inputs, len(self.keys) - 2)
        out: Tensor = self._graph(bucket)(*inputs)
        return out.clone()

    def describe(self) -> dict[str, Any]:
        return {"fast_path": True, "token_buckets": self.buckets, "trim_tokens": self.trim,
                "graphs_recorded": sorted(bucket for bucket, run in self.runs.items() if run.graph is not None)}

