"""Policy inference benchmark: LeRobot's plain path against the policy node's paths, same card, same inputs.

    python -m bench.policy_gpu --device cuda --size default --out bench-policy.json

The deployment is ``configs/lift.yaml`` (2 cameras 3x480x640 + 6 state values). For each case (default
DiffusionPolicy with DDPM-100 and with DDIM-10, default ACT; ``--cases smolvla,pi0,pi05`` for the flow-matching
VLAs, run by ``bench.vla_gpu``) it builds an untrained checkpoint with
``common.tools.checkpoint_maker`` and times, per call, the FULL path: decoded uint8 arrays in, chunk in robot
units (numpy float32) out.

- ``lerobot``: LeRobot's plain path: preprocessor on the new frame (LeRobot's robot convention: float
  [0, 1], CHW), previous frame kept as LeRobot's queue does, ``predict_action_chunk`` on the stacked
  (1, n_obs_steps, ...) batch, postprocessor, ``.numpy()``. Default torch settings (no TF32 matmul).
- node variants: ``nodes.policy.runtime.PolicyRuntime.infer`` with the given speed options, i.e.
  exactly what the policy node runs per request (validation, upload, normalise, model, unnormalise).

Outputs are compared on the same two observations with the same noise (the node's session seed fed to
LeRobot's global generator): max |difference| in robot units and in normalised action units.
Results are printed as a Markdown table and written as JSON lines to ``--out`` as they come, so a run cut
short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.lerobot_guard import guard_lerobot_imports

guard_lerobot_imports()

import torch  # noqa: E402

from common.config import REPO_ROOT, DeploymentConfig, load_config  # noqa: E402
from common.tools.checkpoint_maker import build_checkpoint  # noqa: E402
from common.wire.contract import STATE_KEY, image_key  # noqa: E402
from common.wire.protocol import KIND_REQUEST, Message, decode, encode  # noqa: E402
from nodes.policy.runtime import PolicyRuntime  # noqa: E402
from nodes.policy.sessions import session_seed  # noqa: E402

log = logging.getLogger("bench.policy_gpu")
CLIENT = "bench"

CASES: dict[str, dict[str, Any]] = {
    "ddpm100": {"policy_type": "diffusion", "scheduler": "DDPM", "steps": 100},
    "ddim10": {"policy_type": "diffusion", "scheduler": "DDIM", "steps": 10},
    "act": {"policy_type": "act"},
    # Flow-matching VLAs (bench/vla_gpu.py): default architectures, random weights, LeRobot's fp32 checkpoint
    "smolvla": {"policy_type": "smolvla"},
    "pi0": {"policy_type": "pi0"},
    "pi05": {"policy_type": "pi05"},
}
DEFAULT_CASES = ("ddpm100", "ddim10", "act")
VARIANTS: dict[str, dict[str, Any]] = {
    "exact": {},  # fp32, eager: the node's default
    "exact-graphs": {"cuda_graphs": True},  # fp32, same kernels replayed from a CUDA graph
    # the same, with TF32 off in cuDNN for both paths: what is left of the difference is summation order
    "exact-graphs-strict": {"cuda_graphs": True},
    "fp32-fast": {"compile": True, "cuda_graphs": True, "fast_unet": True},  # TF32 matmuls
    "bf16-fast": {"dtype": "bf16", "compile": True, "cuda_graphs": True, "fast_unet": True},
}


@dataclass
class Result:
    case: str
    path: str
    device: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    calls: int
    max_abs_diff: float | None = None  # robot units, vs LeRobot's plain path
    max_norm_diff: float | None = None  # normalised action units
    rel_norm_diff: float | None = None  # max |diff| / max |LeRobot| in normalised units
    breakdown_ms: dict[str, float] = field(default_factory=dict)
    note: str = ""


def observations(config: DeploymentConfig, count: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1234)
    frames = []
    for _ in range(count):
        arrays = {image_key(name): rng.integers(0, 256, (cam.height, cam.width, 3), dtype=np.uint8)
                  for name, cam in config.cameras.items()}
        arrays[STATE_KEY] = rng.uniform(np.array(config.lower_limits()), np.array(config.upper_limits())
                                        ).astype(np.float32)
        frames.append(arrays)
    return frames


def request(arrays: dict[str, np.ndarray], jpeg: bool = False) -> Message:
    msg = Message(kind=KIND_REQUEST, meta={"op": "infer", "client": CLIENT, "obs_t": 1.0}, arrays=dict(arrays))
    if jpeg:  # through the wire format, as the node receives it: JPEG bytes plus declared shapes
        msg.jpeg = {key for key in arrays if key.startswith("observation.images.")}
        msg = decode(encode(msg))
    return msg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device, warmup: int, iters: int, budget_s: float) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < iters and (len(times) < 5 or time.perf_counter() - started < budget_s):
        begin = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - begin)
    return times


def summary(times: list[float]) -> tuple[float, float, float]:
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return statistics.median(ordered) * 1000, pick(0.1), pick(0.9)


def default_torch_settings(strict: bool = False) -> None:
    """What a plain LeRobot inference script runs with (the node's fast variants change these globally);
    ``strict`` also turns cuDNN's TF32 convolutions off (PyTorch's default has them on)."""
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = not strict
    torch.set_float32_matmul_precision("highest")


class LeRobotPlainPath:
    """preprocessor -> predict_action_chunk -> postprocessor, as LeRobot's own code runs it."""

    def __init__(self, path: Path, device: torch.device, scheduler: str | None, steps: int | None) -> None:
        from lerobot.configs.policies import PreTrainedConfig
        from lerobot.policies.factory import get_policy_class, make_pre_post_processors

        cfg = PreTrainedConfig.from_pretrained(path, local_files_only=True)
        cfg.device = device.type
        cfg.pretrained_backbone_weights = None
        if scheduler:
            cfg.noise_scheduler_type = scheduler
            cfg.num_inference_steps = steps
        self.cfg = cfg
        self.device = device
        self.policy = get_policy_class(cfg.type).from_pretrained(path, config=cfg).eval()
        self.pre, self.post = make_pre_post_processors(
            cfg, pretrained_path=str(path), preprocessor_overrides={"device_processor": {"device": device.type}})
        self.n_obs_steps = getattr(cfg, "n_obs_steps", 1)
        self.previous: dict[str, torch.Tensor] | None = None

    def preprocess(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        raw = {key: torch.from_numpy(np.array(value)).permute(2, 0, 1).float() / 255
               for key, value in arrays.items() if key.startswith("observation.images.")}
        raw[STATE_KEY] = torch.from_numpy(np.array(arrays[STATE_KEY]))
        return {key: value for key, value in self.pre(raw).items() if isinstance(value, torch.Tensor)}

    @torch.no_grad()
    def __call__(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        frame = self.preprocess(arrays)
        if self.n_obs_steps > 1:
            previous = self.previous or frame
            batch = {key: torch.stack([previous[key], frame[key]], dim=1) for key in frame}
            self.previous = frame
        else:
            batch = frame
        chunk = self.policy.predict_action_chunk(batch)
        if self.cfg.type == "act":
            chunk = chunk[:, : self.cfg.n_action_steps]
        return self.post(chunk)[0].numpy()


def normalised_diff(runtime: PolicyRuntime, ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """Max |difference| in normalised action units (the model's output space), absolute and relative."""
    action = runtime.normaliser.action  # the checkpoint's own action stats (default pipelines)

    def to_norm(chunk: np.ndarray) -> np.ndarray:
        return action.normalise(torch.from_numpy(chunk).to(runtime.device)).cpu().numpy()

    a, b = to_norm(ours), to_norm(theirs)
    diff = float(np.abs(a - b).max())
    return diff, diff / max(float(np.abs(b).max()), 1e-12)


def breakdown_of(timings: list[dict[str, float]]) -> dict[str, float]:
    return {key.removesuffix("_s"): statistics.median(t[key] for t in timings) * 1000 for key in timings[-1]}


def measure_lerobot(name: str, spec: dict[str, Any], checkpoint: Path, frames: list[dict[str, np.ndarray]],
                    seed: int, args: argparse.Namespace, emit: Any, strict: bool = False) -> list[np.ndarray]:
    device = torch.device(args.device)
    default_torch_settings(strict)
    plain = LeRobotPlainPath(checkpoint, device, spec.get("scheduler"), spec.get("steps"))
    torch.manual_seed(seed)  # the node's session seed, so both paths draw the same noise
    reference = [plain(frames[0]), plain(frames[1])]
    if strict:  # outputs only; the timing is the default-settings one
        return reference
    times = timed(lambda: plain(frames[1]), device, args.warmup, args.iters, args.budget_s)
    emit(Result(name, "lerobot", torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                *summary(times), calls=len(times)))
    return reference


def measure_variant(name: str, spec: dict[str, Any], variant: str, config: DeploymentConfig,
                    frames: list[dict[str, np.ndarray]], reference: list[np.ndarray], args: argparse.Namespace,
                    emit: Any) -> None:
    device = torch.device(args.device)
    default_torch_settings(strict=variant.endswith("-strict"))
    began = time.perf_counter()
    runtime = PolicyRuntime(config)
    warm = request(frames[1])
    runtime.infer(CLIENT, warm)  # the first call compiles and records the graphs
    setup_s = time.perf_counter() - began
    runtime.reset(CLIENT)
    ours = [runtime.infer(CLIENT, request(frame)).actions for frame in frames[:2]]
    timings: list[dict[str, float]] = []

    def call(msg: Message) -> None:
        timings.append(runtime.infer(CLIENT, msg).timings)

    times = timed(lambda: call(warm), device, args.warmup, args.iters, args.budget_s)
    norm = [normalised_diff(runtime, o, r) for o, r in zip(ours, reference, strict=True)]
    graphs = getattr(runtime.engine, "use_graph", runtime.options.cuda_graphs)
    note = f"setup+first call {setup_s:.1f}s"
    if graphs != runtime.options.cuda_graphs:
        note += "; graph capture failed, ran eagerly"
    emit(Result(name, variant, str(runtime.device), *summary(times), calls=len(times),
                max_abs_diff=max(float(np.abs(o - r).max()) for o, r in zip(ours, reference, strict=True)),
                max_norm_diff=max(n[0] for n in norm), rel_norm_diff=max(n[1] for n in norm),
                breakdown_ms=breakdown_of(timings[-len(times):]), note=note))
    if args.jpeg and spec["policy_type"] == "diffusion" and variant == args.variants.split(",")[-1]:
        jpeg_msg = request(frames[1], jpeg=True)
        times = timed(lambda: call(jpeg_msg), device, args.warmup, args.iters, args.budget_s)
        emit(Result(name, f"{variant}+jpeg-in", str(runtime.device), *summary(times), calls=len(times),
                    breakdown_ms=breakdown_of(timings[-len(times):]), note="JPEG q90, decoded by the node"))


def run_case(name: str, spec: dict[str, Any], variants: list[str], args: argparse.Namespace, workdir: Path,
             emit: Any) -> None:
    device = torch.device(args.device)
    overrides = [f"--policy.device={args.device}", "--policy.warmup=0", f"--policy.cpu_threads={args.cpu_threads}"]
    config = load_config(REPO_ROOT / "configs" / "lift.yaml", overrides)
    checkpoint = workdir / f"{spec['policy_type']}-{args.size}"
    if not (checkpoint / "pretrained_model").is_dir():
        build_checkpoint(config, checkpoint, policy_type=spec["policy_type"], size=args.size)
    checkpoint = checkpoint / "pretrained_model"
    frames = observations(config)
    seed = session_seed(config.policy.seed, CLIENT)
    reference = measure_lerobot(name, spec, checkpoint, frames, seed, args, emit)
    gc.collect()
    for variant in variants:
        if variant.endswith("-strict"):
            reference_for_variant = measure_lerobot(name, spec, checkpoint, frames, seed, args, emit, strict=True)
        else:
            reference_for_variant = reference
        options = dict(VARIANTS[variant])
        if device.type != "cuda":
            options.pop("cuda_graphs", None)
        variant_overrides = [f"--policy.{key}={value}" for key, value in options.items()]
        if spec.get("scheduler"):
            variant_overrides += [f"--policy.noise_scheduler={spec['scheduler']}",
                                  f"--policy.num_inference_steps={spec['steps']}"]
        variant_config = load_config(REPO_ROOT / "configs" / "lift.yaml",
                                     [*overrides, f"--policy.checkpoint={checkpoint}", *variant_overrides])
        try:
            measure_variant(name, spec, variant, variant_config, frames, reference_for_variant, args, emit)
        except Exception as exc:  # report it and go on with the next variant
            log.exception("%s / %s failed", name, variant)
            emit(Result(name, variant, args.device, float("nan"), float("nan"), float("nan"), calls=0,
                        note=f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def markdown(results: list[Result]) -> str:
    lines = ["| case | path | median ms | p10 | p90 | calls | max abs diff (robot units) | max diff (normalised) | "
             "rel. diff | breakdown ms (decode/pre/infer/post) | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        fmt = lambda v: "" if v is None else f"{v:.2e}"  # noqa: E731
        breakdown = "/".join(f"{r.breakdown_ms.get(k, 0):.2f}" for k in ("decode", "preprocess", "inference",
                                                                         "postprocess")) if r.breakdown_ms else ""
        lines.append(f"| {r.case} | {r.path} | {r.median_ms:.2f} | {r.p10_ms:.2f} | {r.p90_ms:.2f} | {r.calls} | "
                     f"{fmt(r.max_abs_diff)} | {fmt(r.max_norm_diff)} | {fmt(r.rel_norm_diff)} | {breakdown} | "
                     f"{r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from bench.vla_gpu import VLA_TYPES, VLA_VARIANTS, run_vla_case  # it imports this module's helpers

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--size", default="default", choices=("default", "tiny"))
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help=f"of {','.join(CASES)}; a VLA case may name its own variants: pi0:bf16-graphs")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--vla-variants", default=",".join(VLA_VARIANTS))
    parser.add_argument("--sync-debug", action="store_true", help="log the host syncs of a VLA's first call")
    parser.add_argument("--delete-checkpoints", action="store_true", help="remove each VLA checkpoint after its case")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=15.0, help="stop a measurement after this (min 5 calls)")
    parser.add_argument("--cpu-threads", type=int, default=0)
    parser.add_argument("--jpeg", action="store_true", help="also time the fastest variant with JPEG images in")
    parser.add_argument("--workdir", default="", help="where checkpoints are built (default: a temp dir)")
    parser.add_argument("--out", default="", help="JSON lines with every result, written as they come")
    parser.add_argument("--markdown", default="", help="also write the result table to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="armpipe-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        log.info("device: %s, torch %s", torch.cuda.get_device_name(0), torch.__version__)
    results: list[Result] = []

    def emit(result: Result) -> None:
        results.append(result)
        log.info("RESULT %s", json.dumps(result.__dict__))
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(result.__dict__) + "\n")

    variants = [v for v in args.variants.split(",") if v]
    vla_variants = [v for v in args.vla_variants.split(",") if v]
    for entry in [c for c in args.cases.split(",") if c]:
        case, _, only = entry.partition(":")  # "pi0:bf16-graphs+exact-graphs": this case's own variants
        if CASES[case]["policy_type"] in VLA_TYPES:
            run_vla_case(case, CASES[case], only.split("+") if only else vla_variants, args, workdir, emit)
            gc.collect()  # the case's model and graphs go before the next case loads
            if args.device == "cuda":
                torch.cuda.empty_cache()
        else:
            run_case(case, CASES[case], variants, args, workdir, emit)
    table = markdown(results)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
