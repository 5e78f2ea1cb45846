"""Chunk engines: a loaded LeRobot policy turned into "one chunk for this session's observation".

Inference paths (all produce the same chunk for the same session seed, up to floating-point rounding):

- exact: LeRobot's own modules in fp32, eager; matches LeRobot's plain path to rounding.
- CUDA graphs: the same kernels recorded once and replayed (removes the CPU launch overhead that
  dominates batch-1 diffusion); still bit-for-bit the exact path's arithmetic.
- fast: bf16 weights (``policy.dtype``), the diffusion UNet restructured for batch 1
  (``policy.fast_unet``: convolutions as matrix products, FiLM for all steps at once), torch.compile,
  then a CUDA graph of the whole loop.

COMPILE_NOTE: cross-session batching runs several batch sizes (one CUDA graph per bucket 1, 2, 4, 8, 16, ...;
on a CPU every size). Compiled with ``dynamic=False`` each size was a compile of its own (five on a GPU with
``max_batch`` 16, minutes cold); with torch's automatic dynamic shapes batch 1 keeps its specialised code and
one more compile, with a symbolic batch dimension, serves every larger size. Measured on the 2-core dev VM
(tiny checkpoints, sizes 1, 2, 4, 3, 8): 2 compiled graphs instead of 5 for DiffusionPolicy's fast UNet step
and for ACT, the chunks within 6e-4 (diffusion) and 7e-5 (ACT) robot units of the eager ones.

DiffusionPolicy is not run through its own ``select_action`` queue (one queue per policy object, which is
what breaks LeRobot's async server for Diffusion): each session keeps the per-frame conditioning vectors
(normalised state plus image features) of its last ``n_obs_steps`` observations, and the sampler runs on
their concatenation, exactly as ``DiffusionModel.generate_actions`` would on the stacked batch. The
denoising loop mirrors diffusers' DDPM/DDIM ``step`` expression for expression, with the noise drawn up
front from the session's generator in the order diffusers draws it, so it can be captured in a graph.

Real-time chunking (``overlap: rtc``) conditions that loop on a prefix by inpainting, in normalised
action space: after every step the prefix rows of the sample are replaced by the prefix noised to the
level of the step just reached (``sqrt(alpha_bar) * prefix + sqrt(1 - alpha_bar) * noise``, with the
request's initial noise), weighted per row: 1 on the frozen rows (so the chunk's first rows are the
prefix, exactly), falling linearly over the soft rows after them, 0 beyond. The prefix and the weights
live in fixed-size buffers (the whole horizon, weight 0 where there is no prefix), so a CUDA graph holds
them; with every weight 0 the blend ``w * known + (1 - w) * sample`` is the sample bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from common.wire.contract import STATE_KEY
from nodes.policy.checkpoint import CheckpointError
from nodes.policy.sessions import Session
from nodes.policy.speed import BucketedGraphs, GraphPool, SpeedOptions, convs_as_matmul

log = logging.getLogger(__name__)

ROW_CHOICES = ("n_action_steps", "horizon")  # policy.rows: the rows of the prediction a reply carries


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
    # rtc inpainting: the noise level the step lands on (sqrt(alpha_bar_prev), sqrt(1 - alpha_bar_prev));
    # (1, 0) after the last step, whose result is the clean sample.
    keep_signal: float = 1.0
    keep_noise: float = 0.0


def _noise_level(scheduler: Any, t: int) -> tuple[float, float]:
    alpha_bar = float(scheduler.alphas_cumprod[t])
    return alpha_bar ** 0.5, (1.0 - alpha_bar) ** 0.5


def initial_noise_level(scheduler: Any) -> tuple[float, float]:
    """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) of the first timestep: how noisy the starting sample is."""
    return _noise_level(scheduler, int(scheduler.timesteps[0]))


def inpaint(sample: Tensor, prefix: Tensor, weight: Tensor, noise: Tensor, signal: Any, noise_scale: Any) -> Tensor:
    """``weight * (signal * prefix + noise_scale * noise) + (1 - weight) * sample``: the rtc prefix at this
    noise level. Exact where the weight is 0 (the sample) or 1 (the noised prefix)."""
    known = signal * prefix + noise_scale * noise
    return weight * known + (1 - weight) * sample


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
    for step, following in zip(steps, [*steps[1:], None], strict=True):
        if following is not None:
            step.keep_signal, step.keep_noise = _noise_level(scheduler, int(following.unet_t))
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
                 options: SpeedOptions, initial_level: tuple[float, float] = (0.0, 1.0)) -> None:
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
                 0.0 if s.noise_std is None else float(s.noise_std), s.keep_signal, s.keep_noise] for s in steps]
        self.coeffs = torch.tensor(rows, dtype=torch.float32, device=device)
        self.step_index = [torch.tensor([i], device=device) for i in range(len(steps))]
        # Steps without noise read the zero row after the drawn ones.
        self.noise_index = [torch.tensor([s.noise_index if s.noise_std is not None else draws], device=device)
                            for s in steps]
        self.initial_level = initial_level
        self.prediction_type = scheduler_config.prediction_type
        self.clip = scheduler_config.clip_sample
        self.clip_range = scheduler_config.clip_sample_range
        # dynamic=None (torch's automatic dynamic shapes): batch 1 compiles for its own shape, the second batch size
        # compiles once with the batch dimension symbolic, and every later size reuses that (COMPILE_NOTE below).
        self.step = torch.compile(self._step, dynamic=None) if options.compile else self._step

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
        """Every block's FiLM embedding for every step and batch row: a list of (steps, batch, channels)."""
        with self.options.autocast():
            embeddings = self.unet.diffusion_step_encoder(self.timesteps)
            steps, batch = len(self.timesteps), global_cond.shape[0]
            feature = torch.cat([embeddings.unsqueeze(1).expand(steps, batch, -1),
                                 global_cond.unsqueeze(0).expand(steps, batch, -1)], dim=-1)
            return [block.cond_encoder(feature) for block in self.blocks]

    def _step(self, sample: Tensor, films: list[Tensor], index: Tensor, step_noise: Tensor,
              noise_index: Tensor, prefix: Tensor, weight: Tensor, noise0: Tensor) -> Tensor:
        with self.options.autocast():
            model_output = self._unet(sample, [film.index_select(0, index)[0] for film in films]).float()
        (eps_coeff, x0_div, c_x0, c_sample, c_eps, noise_std, keep_signal,
         keep_noise) = self.coeffs.index_select(0, index)[0].unbind()
        if self.prediction_type == "epsilon":
            x0 = (sample - eps_coeff * model_output) / x0_div
            eps = model_output
        else:
            x0 = model_output
            eps = (sample - x0_div * x0) / eps_coeff
        if self.clip:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        noise = step_noise.index_select(1, noise_index)[:, 0]
        sample = c_x0 * x0 + c_sample * sample + c_eps * eps + noise_std * noise
        return inpaint(sample, prefix, weight, noise0, keep_signal, keep_noise)

    def sample(self, global_cond: Tensor, noise: Tensor, step_noise: Tensor, prefix: Tensor,
               weight: Tensor) -> Tensor:
        films = self.films(global_cond)
        sample = inpaint(noise, prefix, weight, noise, *self.initial_level)
        for index, noise_index in zip(self.step_index, self.noise_index, strict=True):
            sample = self.step(sample, films, index, step_noise, noise_index, prefix, weight, noise)
        return sample


class DiffusionEngine:
    """DiffusionPolicy served per session: per-frame conditioning history + a mirrored denoising loop."""

    def __init__(self, policy: Any, options: SpeedOptions, prepare: Callable[[dict[str, Tensor]], dict[str, Tensor]],
                 input_keys: list[str], rows: str = "n_action_steps") -> None:
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
        # Sample row ``start`` is the action for the newest observation; LeRobot keeps n_action_steps rows
        # from there, ``policy.rows: horizon`` serves every predicted row (a longer chunk, further ahead).
        self.start = self.n_obs_steps - 1
        if rows not in ROW_CHOICES:
            raise CheckpointError(f"policy.rows: expected one of {list(ROW_CHOICES)}, got {rows!r}")
        self.rows = rows
        self.chunk_rows = self.horizon - self.start if rows == "horizon" else self.n_action_steps
        # The predicted rows after the chunk: never executed, returned as rtc guidance (the actuator sends
        # them back as soft prefix rows with the next request, so the next chunk continues this plan).
        self.guide_rows = self.horizon - self.start - self.chunk_rows
        self.device = options.device
        self.mirrored = self._mirror_supported()
        self.steps = diffusers_steps(self.scheduler, scheduler_type, self.device) if self.mirrored else []
        self.initial_level = initial_noise_level(self.scheduler) if self.mirrored else (0.0, 1.0)
        self.noise_draws = sum(step.noise_std is not None for step in self.steps)
        # rtc: the prefix (normalised) and its per-row weights over the whole horizon; fixed shapes.
        self.rtc_max_rows = self.horizon - self.start if self.mirrored else 0

        if not options.exact:
            torch.backends.cudnn.benchmark = True
            if self.device.type == "cuda":
                self.model.rgb_encoder.to(memory_format=torch.channels_last)  # NHWC suits tensor-core convs
        self.model.to(dtype=options.dtype)
        self.fast: FastDenoiser | None = None
        if options.fast_unet and self.mirrored:
            self.fast = FastDenoiser(self.model.unet, self.steps, scheduler_type, self.scheduler.config, options,
                                     self.initial_level)
        self.unet: Callable[..., Tensor] = self.model.unet
        if options.compile and self.fast is None:
            self.unet = torch.compile(self.model.unet, dynamic=None)  # one recompile for all batch sizes > 1
        graphs = options.cuda_graphs
        if graphs and not self.mirrored:
            log.warning("this scheduler configuration is not mirrored; the sampler runs without CUDA graphs")
        # One CUDA graph per batch-size bucket (nodes.policy.speed.BucketedGraphs); every input is batch-first.
        # The encoder's and the sampler's graphs run one after another and the encoder's output is cloned before
        # the sampler replays: one memory pool for both (nodes.policy.speed.GraphPool).
        pool = GraphPool()
        self.encode = BucketedGraphs(self._encode_inputs, "diffusion encoder", graphs, pool)
        self.sample = BucketedGraphs(self.fast.sample if self.fast else self._sample, "diffusion sampler",
                                     graphs and self.mirrored, pool)

    # -------------------------------------------------------------- scheduler mirror
    def _mirror_supported(self) -> bool:
        sched = self.scheduler.config
        if sched.get("thresholding", False) or sched.get("prediction_type") not in ("epsilon", "sample"):
            return False
        return self.scheduler_type == "DDIM" or sched.get("variance_type", "fixed_small") == "fixed_small"

    def _unet(self, sample: Tensor, step: _DenoiseStep, global_cond: Tensor) -> Tensor:
        with self.options.autocast():
            return self.unet(sample, step.unet_t.expand(sample.shape[0]), global_cond=global_cond).float()

    def _sample(self, global_cond: Tensor, noise: Tensor, step_noise: Tensor, prefix: Tensor,
                weight: Tensor) -> Tensor:
        """The reverse diffusion loop; diffusers' step maths with the noise passed in, inpainted with the rtc
        prefix after every step (a no-op where the weight is 0). Returns fp32 (1, H, A)."""
        cfg = self.scheduler.config
        sample = inpaint(noise, prefix, weight, noise, *self.initial_level)
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
                    sample = sample + step.noise_std * step_noise[:, step.noise_index]
            else:
                direction = step.prev_sample_coeff * pred_epsilon
                sample = step.prev_x0_coeff * pred_original + direction
            sample = inpaint(sample, prefix, weight, noise, step.keep_signal, step.keep_noise)
        return sample

    def _draw_noise(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One session's initial sample (1, H, A), then its step noise (1, draws + 1, H, A): one draw per noisy
        step, in the order diffusers draws them, and a zero row last (read by the steps without noise)."""
        shape = (1, self.horizon, self.action_dim)
        noise = torch.randn(shape, dtype=torch.float32, device=self.device, generator=generator)
        step_noise = torch.zeros((1, self.noise_draws + 1, self.horizon, self.action_dim), dtype=torch.float32,
                                 device=self.device)
        for index in range(self.noise_draws):
            torch.randn(shape, generator=generator, out=step_noise[:, index])
        return noise, step_noise

    # -------------------------------------------------------------- encoder
    def _encode_inputs(self, *tensors: Tensor) -> Tensor:
        """A batch of one frame per row (uint8 images, state; or already normalised) -> fp32 conditioning (B, C)."""
        batch = self.prepare(dict(zip(self.input_keys, tensors, strict=True)))
        images = torch.stack([batch[key] for key in self.config.image_features], dim=1)  # (B, n_cams, 3, H, W)
        frame = {STATE_KEY: batch[STATE_KEY].unsqueeze(1), "observation.images": images.unsqueeze(1)}
        with self.options.autocast():
            return self.model._prepare_global_conditioning(frame).float()

    # -------------------------------------------------------------- public
    def _prefix(self, rtc: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """One row's rtc buffers over the whole horizon: the prefix (1, H, A), normalised, with prefix row k at
        sample row start + k, and its weights (1, H, 1); all zero (the plain sample) without a prefix."""
        prefix_rows = torch.zeros((1, self.horizon, self.action_dim), dtype=torch.float32, device=self.device)
        weights = torch.zeros((1, self.horizon, 1), dtype=torch.float32, device=self.device)
        if rtc is None:
            return prefix_rows, weights
        prefix, weight = rtc
        rows = prefix.shape[0]
        if not 1 <= rows <= self.rtc_max_rows:
            raise ValueError(f"rtc prefix: expected 1..{self.rtc_max_rows} rows, got {rows}")
        prefix_rows[0, self.start:self.start + rows] = prefix.to(torch.float32)
        weights[0, self.start:self.start + rows, 0] = weight.to(torch.float32)
        return prefix_rows, weights

    @torch.no_grad()
    def chunk(self, session: Session, inputs: dict[str, Tensor], rtc: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """One chunk for the session (``inputs`` a batch of one row): ``chunk_batch`` of one."""
        return self.chunk_batch([session], inputs, [rtc])

    @torch.no_grad()
    def chunk_batch(self, sessions: list[Session], inputs: dict[str, Tensor],
                    rtcs: list[tuple[Tensor, Tensor] | None]) -> Tensor:
        """One chunk per session, row i of ``inputs`` being session i's observation (each session at most once):
        (B, chunk_rows + guide_rows, A), normalised, the chunk's rows then its ``guide_rows`` guidance rows.
        ``rtcs[i]``: (normalised prefix (n, A), weights (n,)) for session i to continue, or None.

        Each row keeps its session's own state exactly: its history of conditioning vectors, its seeded noise
        (drawn from its own generator, in the order it would be alone) and its prefix; only the model calls are
        shared. Row i's chunk is the one the session gets alone, up to the rounding of batched kernels."""
        if any(rtc is not None for rtc in rtcs) and not self.mirrored:
            raise ValueError("rtc needs the mirrored sampler (DDIM, or DDPM with fixed_small variance)")
        if len({id(session) for session in sessions}) != len(sessions):
            raise ValueError("a batch holds each session at most once (its history moves on with each chunk)")
        conds = self.encode(*(inputs[key] for key in self.input_keys)).clone()
        global_conds: list[Tensor] = []
        for row, session in enumerate(sessions):
            cond = conds[row:row + 1]
            history = list(session.history) or [cond] * (self.n_obs_steps - 1)  # LeRobot repeats the first frame
            frames = [*history[len(history) - (self.n_obs_steps - 1):], cond] if self.n_obs_steps > 1 else [cond]
            global_conds.append(torch.cat(frames, dim=-1))
        global_cond = torch.cat(global_conds)
        if self.mirrored:
            draws = [self._draw_noise(session.generator) for session in sessions]
            buffers = [self._prefix(rtc) for rtc in rtcs]
            sample = self.sample(global_cond, torch.cat([noise for noise, _ in draws]),
                                 torch.cat([step_noise for _, step_noise in draws]),
                                 torch.cat([prefix for prefix, _ in buffers]),
                                 torch.cat([weight for _, weight in buffers]))
        else:
            # LeRobot's own sampler draws from one generator for the whole batch: row by row keeps each session's.
            self.model.noise_scheduler = self.scheduler
            self.model.num_inference_steps = self.num_steps
            sample = torch.cat([self.model.conditional_sample(1, global_cond=global_conds[row],
                                                              generator=session.generator).float()
                                for row, session in enumerate(sessions)])
        start = self.start
        actions = sample[:, start:start + self.chunk_rows + self.guide_rows].clone()
        # Only a successful chunk moves the history on, so a failed request leaves the session as it was.
        for row, session in enumerate(sessions):
            cond = conds[row:row + 1]
            if not session.history:
                session.history.extend([cond] * (self.n_obs_steps - 1))
            session.history.append(cond)
        return actions

    @property
    def chunk_length(self) -> int:
        return self.chunk_rows

    def describe(self) -> dict[str, Any]:
        return {"noise_scheduler": self.scheduler_type, "num_inference_steps": self.num_steps,
                "horizon": self.horizon, "mirrored_sampler": self.mirrored, "rows": self.rows,
                "rtc_max_prefix_rows": self.rtc_max_rows}


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
            forward = torch.compile(self._forward, dynamic=None)  # one recompile for all batch sizes > 1
        self.forward = forward
        # The device context only while recording: eagerly it would only add per-op overhead.
        self.run = BucketedGraphs(self._forward_on_device if options.cuda_graphs else self.forward,
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

    rtc_max_rows = 0  # no rtc: these policies do not denoise
    guide_rows = 0

    @torch.no_grad()
    def chunk(self, session: Session, inputs: dict[str, Tensor], rtc: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return self.chunk_batch([session], inputs, [rtc])

    @torch.no_grad()
    def chunk_batch(self, sessions: list[Session], inputs: dict[str, Tensor],
                    rtcs: list[tuple[Tensor, Tensor] | None]) -> Tensor:
        """One chunk per row of ``inputs`` (B, n_action_steps, A): these policies keep no per-session state and
        draw no noise, so a batch is one forward pass of the stacked observations."""
        if any(rtc is not None for rtc in rtcs):
            raise ValueError(f"rtc is not available for policy type '{self.config.type}'")
        return self.run(*(inputs[key] for key in self.input_keys)).clone()

    @property
    def chunk_length(self) -> int:
        return self.n_action_steps

    def describe(self) -> dict[str, Any]:
        return {"rows": "n_action_steps", "rtc_max_prefix_rows": 0}
