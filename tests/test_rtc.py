"""Real-time chunking for DiffusionPolicy: a chunk continues the frozen prefix it was given.

Runs the real tiny DiffusionPolicy of the checkpoint maker on the CPU through the policy runtime, the
same code the policy node serves with. On a CUDA machine the same checks run on the CUDA-graph and fast
(bf16, fast UNet, compiled, graphed) paths:

    .venv/bin/python -m pytest -q tests/test_rtc.py -k cuda
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_policy_runtime import make_runtime

from common.wire.contract import RTC_DELAY_KEY, RTC_PREFIX_KEY
from common.wire.protocol import Message, ProtocolError
from nodes.policy.checkpoint import CheckpointError
from nodes.policy.io import guidance_weights
from nodes.policy.runtime import PolicyRuntime


def observation(config, seed: int, prefix: np.ndarray | None = None, delay: int | None = None) -> Message:
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {
        f"observation.images.{name}": rng.integers(0, 256, (cam.height, cam.width, 3), dtype=np.uint8)
        for name, cam in config.cameras.items()}
    lower, upper = np.array(config.lower_limits()), np.array(config.upper_limits())
    arrays["observation.state"] = rng.uniform(lower, upper).astype(np.float32)
    meta: dict = {"op": "infer", "client": "robot-a", "obs_t": 1.0}
    if prefix is not None:
        arrays[RTC_PREFIX_KEY] = prefix
    if delay is not None:
        meta[RTC_DELAY_KEY] = delay
    return Message(kind="request", meta=meta, arrays=arrays)


@pytest.fixture(scope="module")
def runtime(tiny_checkpoint, tmp_path_factory) -> PolicyRuntime:
    return make_runtime(tmp_path_factory.mktemp("rtc"), tiny_checkpoint("lift", "diffusion"))


@pytest.mark.parametrize("scheduler", ["DDIM", "DDPM"])
def test_an_rtc_chunk_starts_with_the_frozen_prefix(scheduler: str, tiny_checkpoint, tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, tiny_checkpoint("lift", "diffusion"), noise_scheduler=scheduler,
                           num_inference_steps=10)
    assert runtime.contract.extra["rtc_max_prefix_rows"] == 15  # horizon 16, n_obs_steps 2
    reply = runtime.infer("robot-a", observation(runtime.config, 1))
    # The next request is sent 3 rows into the first chunk; 3 more rows will run while it is computed,
    # then the 2 queued rows and the first chunk's guidance rows guide it softly.
    prefix = np.ascontiguousarray(np.concatenate([reply.actions[3:8], reply.guide]))
    delay = 3
    free = runtime.infer("robot-b", observation(runtime.config, 2)).actions
    continued = runtime.infer("robot-a", observation(runtime.config, 2, prefix, delay)).actions
    assert continued.shape == (8, 6)
    # Frozen rows: the prefix itself (up to normalise/unnormalise rounding, robot units of ~100).
    np.testing.assert_allclose(continued[:delay], prefix[:delay], rtol=0, atol=1e-3)
    # The unconditioned sample is somewhere else entirely, so the equality above is the inpainting's doing.
    assert np.abs(free[:delay] - prefix[:delay]).max() > 1.0
    # Soft rows are pulled towards the prefix: closer than the free sample is.
    soft = slice(delay, len(continued))
    assert np.abs(continued[soft] - prefix[soft]).mean() < np.abs(free[soft] - prefix[soft]).mean()
    assert np.all(np.isfinite(continued))


def test_the_fast_unet_path_continues_the_prefix_too(tiny_checkpoint, tmp_path: Path) -> None:
    """policy.fast_unet (its compiled step carries the same inpainting): frozen rows equal the prefix."""
    fast = make_runtime(tmp_path, tiny_checkpoint("lift", "diffusion"), fast_unet=True)
    first = fast.infer("robot-a", observation(fast.config, 1)).actions
    prefix = np.ascontiguousarray(first[2:7])
    continued = fast.infer("robot-a", observation(fast.config, 2, prefix, 3)).actions
    np.testing.assert_allclose(continued[:3], prefix[:3], rtol=0, atol=1e-3)


CUDA_PATHS = {
    "cuda graphs": {"cuda_graphs": True},
    "fast": {"cuda_graphs": True, "fast_unet": True, "compile": True, "dtype": "bf16"},
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path", sorted(CUDA_PATHS))
def test_rtc_on_cuda_graphs_starts_with_the_frozen_prefix(path: str, tiny_checkpoint, tmp_path: Path) -> None:
    """The recorded sampler reads the rtc buffers on every replay: frozen rows equal the prefix, a plain
    request after an rtc one is the plain chunk again, and (fp32 graphs) the graph equals the eager GPU path."""
    checkpoint = tiny_checkpoint("lift", "diffusion")
    graphed = make_runtime(tmp_path / "graphed", checkpoint, device="cuda", warmup=1, **CUDA_PATHS[path])
    plain = graphed.infer("robot-a", observation(graphed.config, 1))
    prefix = np.ascontiguousarray(np.concatenate([plain.actions[3:8], plain.guide]))
    continued = graphed.infer("robot-a", observation(graphed.config, 2, prefix, 3))
    np.testing.assert_allclose(continued.actions[:3], prefix[:3], rtol=0, atol=1e-3)
    assert np.abs(continued.actions[3:] - plain.actions[3:]).max() > 0  # the chunk did change after the prefix
    graphed.reset("robot-a")  # same seed, same history: the plain chunk again, whatever the buffers held
    np.testing.assert_allclose(graphed.infer("robot-a", observation(graphed.config, 1)).actions, plain.actions,
                               rtol=0, atol=1e-4)
    if path == "cuda graphs":
        eager = make_runtime(tmp_path / "eager", checkpoint, device="cuda")
        np.testing.assert_allclose(eager.infer("robot-a", observation(eager.config, 1)).actions, plain.actions,
                                   rtol=0, atol=1e-4)
        again = eager.infer("robot-a", observation(eager.config, 2, prefix, 3))
        np.testing.assert_allclose(again.actions, continued.actions, rtol=0, atol=1e-4)
        np.testing.assert_allclose(again.guide, continued.guide, rtol=0, atol=1e-4)


def test_a_request_without_prefix_is_unchanged_by_the_rtc_buffers(runtime: PolicyRuntime) -> None:
    runtime.reset("robot-c")
    plain = runtime.infer("robot-c", observation(runtime.config, 7)).actions
    # An rtc request in between fills the buffers; the next plain request must not see them.
    runtime.infer("robot-d", observation(runtime.config, 8, plain[:4].copy(), 4))
    runtime.reset("robot-c")
    again = runtime.infer("robot-c", observation(runtime.config, 7)).actions
    np.testing.assert_array_equal(plain, again)


def test_guidance_weights_are_one_on_frozen_rows_and_fall_to_zero() -> None:
    np.testing.assert_allclose(guidance_weights(6, 2, "linear"), [1, 1, 0.8, 0.6, 0.4, 0.2])
    np.testing.assert_allclose(guidance_weights(3, 3, "linear"), [1, 1, 1])
    np.testing.assert_allclose(guidance_weights(2, 0, "linear"), [2 / 3, 1 / 3])
    # exp (Black et al. 2025): c * (e^c - 1) / (e - 1) of the linear c; below it, equal at 1 and 0.
    c = np.array([0.8, 0.6, 0.4, 0.2])
    exp = guidance_weights(6, 2, "exp")
    np.testing.assert_allclose(exp, [1, 1, *(c * (np.exp(c) - 1) / (np.e - 1))], rtol=1e-6)
    assert np.all(np.diff(exp) <= 0) and np.all(exp[2:] < c)
    np.testing.assert_allclose(guidance_weights(3, 3, "exp"), [1, 1, 1])
    with pytest.raises(ValueError, match="exp or linear"):
        guidance_weights(3, 1, "cosine")


def test_the_rows_after_the_chunk_come_back_as_guidance(tiny_checkpoint, tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint("lift", "diffusion")
    short = make_runtime(tmp_path / "short", checkpoint)
    long = make_runtime(tmp_path / "long", checkpoint, rows="horizon")
    assert short.contract.extra["rtc_guide_rows"] == 7 and long.contract.extra["rtc_guide_rows"] == 0
    assert short.contract.extra["rtc_guidance"] == "exp"
    msg = observation(short.config, 5)
    reply, whole = short.infer("robot-a", msg), long.infer("robot-a", msg)
    # The guide is the rest of the same prediction: rows 8..14 of the horizon served whole.
    assert reply.guide.shape == (7, 6) and long.infer("robot-b", msg).guide.shape == (0, 6)
    np.testing.assert_array_equal(np.concatenate([reply.actions, reply.guide]), whole.actions)


BAD = {
    "prefix too long": (np.zeros((16, 6), np.float32), 2, f"arrays[{RTC_PREFIX_KEY}]", "float32 [1..15, 6]"),
    "wrong width": (np.zeros((4, 5), np.float32), 2, f"arrays[{RTC_PREFIX_KEY}]", "float32 [1..15, 6]"),
    "float64": (np.zeros((4, 6), np.float64), 2, f"arrays[{RTC_PREFIX_KEY}]", "float32"),
    "NaN": (np.array([[0, 0, np.nan, 0, 0, 0]] * 2, np.float32), 1, f"arrays[{RTC_PREFIX_KEY}]", "finite"),
    "delay beyond the prefix": (np.zeros((4, 6), np.float32), 5, f"meta.{RTC_DELAY_KEY}", "0..4"),
    "delay not an int": (np.zeros((4, 6), np.float32), 1.5, f"meta.{RTC_DELAY_KEY}", "integer"),
    "delay without prefix": (None, 2, f"arrays[{RTC_PREFIX_KEY}]", "array is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_rtc_fields_are_named(case: str, runtime: PolicyRuntime) -> None:
    prefix, delay, field, expected = BAD[case]
    with pytest.raises(ProtocolError) as info:
        runtime.infer("robot-e", observation(runtime.config, 3, prefix, delay))
    assert info.value.field == field
    assert expected in info.value.expected


def test_act_refuses_an_rtc_prefix_and_horizon_rows(tiny_checkpoint, tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint("lift", "act")
    act = make_runtime(tmp_path / "act", checkpoint)
    assert act.contract.extra["rtc_max_prefix_rows"] == 0
    with pytest.raises(ProtocolError) as info:
        act.infer("robot-a", observation(act.config, 1, np.zeros((2, 6), np.float32), 1))
    assert info.value.field == f"arrays[{RTC_PREFIX_KEY}]"
    with pytest.raises(CheckpointError, match=r"policy\.rows"):
        make_runtime(tmp_path / "act-horizon", checkpoint, rows="horizon")


def test_horizon_rows_serve_the_whole_prediction(tiny_checkpoint, tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint("lift", "diffusion")
    short = make_runtime(tmp_path / "short", checkpoint)
    long = make_runtime(tmp_path / "long", checkpoint, rows="horizon")
    assert (short.contract.chunk_length, long.contract.chunk_length) == (8, 15)
    assert long.contract.extra["rows"] == "horizon"
    msg = observation(short.config, 5)
    # The same session seed draws the same noise: the first 8 rows are the n_action_steps chunk.
    np.testing.assert_array_equal(long.infer("robot-a", msg).actions[:8], short.infer("robot-a", msg).actions)
