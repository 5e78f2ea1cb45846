"""The flow-matching VLAs (SmolVLA, pi0, pi0.5) in the policy GPU benchmark: LeRobot's plain path against the
node's fast paths (``nodes.policy.vla_fast``: fp32 or bf16 with CUDA graphs), on one loaded model.

    python -m bench.policy_gpu --device cuda --size default --cases smolvla,pi0:bf16-graphs,pi05:bf16-graphs
    python -m bench.vla_gpu --device cuda --size default    # the same, all three VLAs

``bench.policy_gpu`` runs a VLA case through ``run_vla_case`` here; the shared parts (the observations, the
timing, the result rows) are that module's. docs/benchmarks.md, "The VLA fast path".
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from common.lerobot_guard import guard_lerobot_imports

guard_lerobot_imports()

import torch  # noqa: E402

from bench.policy_gpu import (  # noqa: E402
    CLIENT,
    PolicyRuntime,
    Result,
    breakdown_of,
    default_torch_settings,
    observations,
    request,
    summary,
    timed,
)
from common.config import REPO_ROOT, load_config  # noqa: E402
from common.tools.checkpoint_maker import build_checkpoint  # noqa: E402
from common.wire.contract import STATE_KEY  # noqa: E402
from common.wire.protocol import Message  # noqa: E402
from nodes.policy.sessions import session_seed  # noqa: E402
from nodes.policy.speed import SpeedOptions  # noqa: E402
from nodes.policy.vla import FlowMatchingEngine  # noqa: E402
from nodes.policy.vla_fast import to_fp32  # noqa: E402

log = logging.getLogger("bench.vla_gpu")
VLA_TYPES = ("smolvla", "pi0", "pi05")
# The VLAs' node paths (nodes.policy.vla_fast), run in this order on ONE loaded model (bf16 converts it in place).
VLA_VARIANTS: dict[str, dict[str, Any]] = {
    "exact-graphs": {"cuda_graphs": True},  # fp32, LeRobot's kernels replayed from one CUDA graph
    "bf16-graphs": {"dtype": "bf16", "cuda_graphs": True},  # bf16 weights, instruction trimmed to its bucket
}
VLA_INSTRUCTION = "pick up the red cube and put it in the box"


def run_vla_case(name: str, spec: dict[str, Any], variants: list[str], args: argparse.Namespace, workdir: Path,
                 emit: Any) -> None:
    """A VLA: LeRobot's plain path (its own preprocessor, ``predict_action_chunk``, postprocessor), timed at the
    checkpoint's precision and, as the outputs' reference, in fp32, and the node's fast paths, all on one loaded
    model in this process (a 4 B-parameter checkpoint is loaded once): the node's
    ``PolicyRuntime`` with default options loads it, LeRobot's plain path runs on its policy and processors, then the
    runtime's engine is rebuilt with each variant's options, as the node builds it at start."""
    device = torch.device(args.device)
    overrides = [f"--policy.device={args.device}", "--policy.warmup=0", f"--policy.cpu_threads={args.cpu_threads}"]
    config = load_config(REPO_ROOT / "configs" / "lift.yaml", overrides)
    checkpoint = workdir / f"{spec['policy_type']}-{args.size}"
    began = time.perf_counter()
    if not (checkpoint / "pretrained_model").is_dir():
        build_checkpoint(config, checkpoint, policy_type=spec["policy_type"], size=args.size, device=args.device)
    built_s = time.perf_counter() - began
    config = load_config(REPO_ROOT / "configs" / "lift.yaml",
                         [*overrides, f"--policy.checkpoint={checkpoint / 'pretrained_model'}"])
    default_torch_settings()
    began = time.perf_counter()
    runtime = PolicyRuntime(config)
    load_s = time.perf_counter() - began
    engine = runtime.engine
    assert isinstance(engine, FlowMatchingEngine)
    frames = observations(config)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    # LeRobot's plain path: the node's session noise (its seeded generator, one draw per request) passed in.
    generator = torch.Generator(device=device).manual_seed(session_seed(config.policy.seed, CLIENT))
    noises = [torch.randn(engine.noise_shape, dtype=torch.float32, device=device, generator=generator)
              for _ in frames]
    pre, post, policy = runtime.preprocessor, runtime.postprocessor, runtime.policy

    def lerobot(arrays: dict[str, np.ndarray], noise: torch.Tensor, **rtc: Any) -> np.ndarray:
        raw: dict[str, Any] = {key: torch.from_numpy(np.array(value)).permute(2, 0, 1).float() / 255
                               for key, value in arrays.items() if key.startswith("observation.images.")}
        raw[STATE_KEY] = torch.from_numpy(np.array(arrays[STATE_KEY]))
        raw["task"] = VLA_INSTRUCTION
        with torch.no_grad():
            chunk = policy.predict_action_chunk(pre(raw), noise=noise, **rtc)[:, : engine.chunk_length]
        return post(chunk)[0].numpy()

    # Timed at the checkpoint's own precision (the maker's default pi0 / pi0.5: LeRobot's dtype bfloat16) ...
    times = timed(lambda: lerobot(frames[1], noises[1]), device, args.warmup, args.iters, args.budget_s)
    precision = sorted({str(p.dtype).removeprefix("torch.") for p in policy.parameters()})
    emit(Result(name, "lerobot", card, *summary(times), calls=len(times),
                note=f"checkpoint precision ({'+'.join(precision)}), {engine.describe()['num_steps']} steps; "
                     f"checkpoint built in {built_s:.0f}s, node load {load_s:.1f}s"))
    # ... the outputs compared against its fp32 path: the same weights upcast with LeRobot's own method (exact).
    to_fp32(policy)
    reference = [lerobot(frame, noise) for frame, noise in zip(frames, noises, strict=True)]
    prefix_rows = np.ascontiguousarray(reference[0][5:15])  # an rtc request: 10 rows left, 4 of them frozen
    prefix = engine.normalise_action.normalise(torch.from_numpy(prefix_rows).to(device)).unsqueeze(0)
    rtc_kwargs = {"prev_chunk_left_over": prefix, "inference_delay": 4, "execution_horizon": 10}
    rtc_reference = lerobot(frames[1], noises[1], **rtc_kwargs)
    if precision != ["float32"]:
        times = timed(lambda: lerobot(frames[1], noises[1]), device, 1, max(3, args.iters // 4), args.budget_s)
        emit(Result(name, "lerobot-fp32", card, *summary(times), calls=len(times),
                    note="the same weights upcast to fp32 (LeRobot's own dtype switch): the outputs' reference"))

    timings: list[dict[str, float]] = []

    def call(msg: Message) -> None:
        timings.append(runtime.infer(CLIENT, msg).timings)

    def to_norm(chunk: np.ndarray) -> np.ndarray:
        return engine.normalise_action.normalise(torch.from_numpy(chunk).to(device)).cpu().numpy()

    def diffs(ours: list[np.ndarray], theirs: list[np.ndarray]) -> tuple[float, float, float]:
        absolute = max(float(np.abs(o - t).max()) for o, t in zip(ours, theirs, strict=True))
        norm = max(float(np.abs(to_norm(o) - to_norm(t)).max()) for o, t in zip(ours, theirs, strict=True))
        scale = max(float(np.abs(to_norm(t)).max()) for t in theirs)
        return absolute, norm, norm / max(scale, 1e-12)

    for variant in variants:
        settings = dict(VLA_VARIANTS[variant])
        if device.type != "cuda":
            settings.pop("cuda_graphs", None)
        try:
            began = time.perf_counter()
            runtime.config.policy.dtype = settings.get("dtype", "fp32")
            runtime.config.policy.cuda_graphs = bool(settings.get("cuda_graphs", False))
            runtime.options = options = SpeedOptions.from_config(runtime.config.policy, device)
            if not options.exact:
                torch.set_float32_matmul_precision("high")  # as the node does for a non-exact path
            runtime.engine = engine = FlowMatchingEngine(policy, pre, options, device,
                                                         runtime.config.policy.rtc_guidance)
            warm = request(frames[1])
            warm.meta["instruction"] = VLA_INSTRUCTION
            if args.sync_debug and device.type == "cuda":  # name every host sync of the eager passes in the log
                torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                runtime.infer(CLIENT, warm)  # records every token bucket's graph
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
            setup_s = time.perf_counter() - began
            runtime.reset(CLIENT)
            msgs = [request(frame) for frame in frames]
            for msg in msgs:
                msg.meta["instruction"] = VLA_INSTRUCTION
            ours = [runtime.infer(CLIENT, msg).actions for msg in msgs]
            times = timed(lambda msg=msgs[1]: call(msg), device, args.warmup, args.iters, args.budget_s)
            absolute, norm, rel = diffs(ours, reference)
            info = engine.describe()
            recorded = info.get("graphs_recorded", [])
            note = (f"engine build + first call (graphs of buckets {recorded}) {setup_s:.1f}s; "
                    f"GPU memory peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                    if device.type == "cuda" else f"setup {setup_s:.1f}s")
            if options.cuda_graphs and not recorded:
                note += "; graph capture failed, ran eagerly"
            emit(Result(name, variant, card, *summary(times), calls=len(times), max_abs_diff=absolute,
                        max_norm_diff=norm, rel_norm_diff=rel, breakdown_ms=breakdown_of(timings[-len(times):]),
                        note=note))
            # rtc through the same graph: the prefix and its weights are graph inputs.
            rtc_msg = request(frames[1])
            rtc_msg.meta["instruction"] = VLA_INSTRUCTION
            rtc_msg.arrays["rtc_prefix"] = prefix_rows
            rtc_msg.meta["rtc_delay_rows"] = 4
            runtime.reset(CLIENT)
            runtime.infer(CLIENT, msgs[0])  # the session's second draw, as for rtc_reference
            guided = runtime.infer(CLIENT, rtc_msg).actions
            times = timed(lambda msg=rtc_msg: call(msg), device, args.warmup, args.iters, args.budget_s)
            absolute, norm, rel = diffs([guided], [rtc_reference])
            emit(Result(name, f"{variant}+rtc", card, *summary(times), calls=len(times), max_abs_diff=absolute,
                        max_norm_diff=norm, rel_norm_diff=rel, breakdown_ms=breakdown_of(timings[-len(times):]),
                        note="rtc prefix 10 rows, 4 frozen; vs LeRobot's RTCProcessor path"))
        except Exception as exc:  # report it and go on with the next variant
            log.exception("%s / %s failed", name, variant)
            emit(Result(name, variant, args.device, float("nan"), float("nan"), float("nan"), calls=0,
                        note=f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
    if args.delete_checkpoints:
        shutil.rmtree(checkpoint, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """``bench.policy_gpu`` with the three VLAs as its cases (a ``--cases`` given here wins)."""
    from bench.policy_gpu import main as policy_gpu_main

    policy_gpu_main(["--cases", ",".join(VLA_TYPES), *(argv or [])])


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
