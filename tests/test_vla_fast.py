"""The fast path of the flow-matching VLAs (nodes/policy/vla_fast.py) with the maker's tiny SmolVLA, pi0 and pi0.5 on
the CPU: the
same chunks as LeRobot's plain path through its structure (the instruction padded or cut to a token bucket, the
prefix and its KV cache inside one call, real-time chunking's prefix and weights as inputs), a warm call that a CUDA
graph capture can hold (nothing copied from the host, no host sync), and bf16 served by the node. The CUDA graphs
themselves are checked by the CUDA-only test at the end (skipped without a GPU) and by bench/vla_gpu.py on the
GPU machine (docs/benchmarks.md)."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from test_policy_runtime import make_runtime, observation
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from nodes.policy.speed import SpeedOptions
from nodes.policy.vla_fast import MASK_KEY, TOKENS_KEY, FastFlowMatching, token_buckets

INSTRUCTIONS = ("pick up the red cube", "take the small red cube and put it into the blue box")


TYPES = ("smolvla", "pi0", "pi05")


@pytest.fixture(scope="module")
def smolvla(tiny_checkpoint) -> Path:
    return tiny_checkpoint("lift", "smolvla")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-hf-cache")))


def _fp32(device: str = "cpu") -> SpeedOptions:
    return SpeedOptions(device=torch.device(device), dtype=torch.float32, num_inference_steps=0, noise_scheduler="",
                        compile=False, cuda_graphs=False, fast_unet=False)


def _batch(runtime, seed: int, text: str) -> dict[str, torch.Tensor]:
    msg = observation(runtime.config, seed)
    msg.meta["instruction"] = text
    obs = runtime.check(msg)
    return runtime.normaliser.prepare(runtime.inputs.load_batch([obs]), task=obs.instruction)


def _noise(runtime, seed: int) -> torch.Tensor:
    return torch.randn(runtime.engine.noise_shape, generator=torch.Generator().manual_seed(seed))


def test_token_buckets_are_capped_by_the_tokenizer_length() -> None:
    assert token_buckets(48) == [16, 32, 48]
    assert token_buckets(200) == [16, 32, 48, 64, 96, 128, 200]


@pytest.mark.parametrize("policy_type", TYPES)
def test_buckets_cache_and_rtc_inputs_give_lerobots_chunks(policy_type: str, tiny_checkpoint, tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, tiny_checkpoint("lift", policy_type))
    policy = runtime.policy
    batches = [_batch(runtime, seed, text) for seed, text in enumerate(INSTRUCTIONS)]
    lengths = [int(batch[MASK_KEY].sum()) for batch in batches]
    noise = _noise(runtime, 7)
    plain = [policy.predict_action_chunk(dict(batch), noise=noise) for batch in batches]
    # LeRobot's real-time chunking (its RTCProcessor, autograd and all) on a prefix of 10 rows, 4 frozen.
    prefix = plain[0][:, 3:13].clone()
    guided = policy.predict_action_chunk(dict(batches[0]), noise=noise, prev_chunk_left_over=prefix,
                                         inference_delay=4, execution_horizon=10)
    assert (guided - plain[0]).abs().max() > 0.05

    fast = FastFlowMatching(policy, _fp32(), torch.device("cpu"), rtc=True, host_constants=True)
    assert len({fast.bucket_for(length) for length in lengths}) == 2  # two instructions, two buckets
    seen: list[int] = []
    run = fast._run

    def watched(*tensors):
        seen.append(int(tensors[-5].shape[1]))  # the token columns the model call got
        return run(*tensors)

    fast._run = watched  # type: ignore[method-assign]
    for batch, expected in zip(batches, plain, strict=True):
        torch.testing.assert_close(fast.chunk(dict(batch), noise), expected, rtol=1e-5, atol=1e-5)
    # exact (fp32): padded up to the bucket, never cut below LeRobot's own padding
    assert seen == [max(fast.bucket_for(n), int(b[TOKENS_KEY].shape[1])) for n, b in zip(lengths, batches, strict=True)]
    torch.testing.assert_close(fast.chunk(dict(batches[0]), noise, (prefix, 4, 10)), guided, rtol=1e-5, atol=1e-5)
    # The prefix and weights are inputs: the next request without a prefix is the plain chunk again.
    torch.testing.assert_close(fast.chunk(dict(batches[0]), noise), plain[0], rtol=1e-5, atol=1e-5)

    # Padded to the tokenizer's max_length (as pi0 / pi0.5's tokenizer step pads) and cut back to the instruction's
    # bucket, as the bf16 path does: the same chunk.
    padded = dict(batches[0])
    extra = fast.max_tokens - padded[TOKENS_KEY].shape[1]
    padded[TOKENS_KEY] = torch.nn.functional.pad(padded[TOKENS_KEY], (0, extra), value=0)
    padded[MASK_KEY] = torch.nn.functional.pad(padded[MASK_KEY], (0, extra), value=False)
    fast.trim = True
    seen.clear()
    torch.testing.assert_close(fast.chunk(padded, noise), plain[0], rtol=1e-5, atol=1e-5)
    assert seen == [fast.bucket_for(lengths[0])] and seen[0] < fast.max_tokens


class _HostData(TorchFunctionMode):
    """``torch.tensor`` of Python data reaching torch under the engine's own cache: a host-to-device copy on CUDA.
    (A host tensor moved with ``.to(device)`` is a copy only where the device is not the CPU: the GPU run checks it.)"""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.tensor and args and not isinstance(args[0], torch.Tensor):
            self.calls.append(f"torch.tensor({args[0]!r:.40})")
        return func(*args, **kwargs)


class _Syncs(TorchDispatchMode):
    """Operators that read a device value back to the host (a sync, which a capture refuses)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if any(word in name for word in ("_local_scalar_dense", "nonzero", "aten.item", "masked_select")):
            self.ops.append(name)
        # Boolean-mask indexing (``x[mask]``, ``x[mask] = y``) reaches the dispatcher as index / index_put with a
        # bool index tensor; on CUDA its kernel counts the mask on the host (a nonzero inside), a sync all the same.
        elif func.__name__.split(".")[0] in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)
                for index in (args[1] if len(args) > 1 else ())):
            self.ops.append(f"{name} with a bool index")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("policy_type", TYPES)
def test_a_warm_call_copies_nothing_from_the_host_and_never_syncs(policy_type: str, tiny_checkpoint,
                                                                  tmp_path: Path) -> None:
    # What a CUDA graph capture needs, checked on the CPU: after the first (eager) call, the model call as a
    # capture runs it (transformers skips its data-dependent mask checks while a stream captures) makes no tensor
    # from host data and reads nothing back.
    runtime = make_runtime(tmp_path, tiny_checkpoint("lift", policy_type))
    fast = FastFlowMatching(runtime.policy, _fp32(), torch.device("cpu"), rtc=True, host_constants=True)
    batch, noise = _batch(runtime, 1, INSTRUCTIONS[0]), _noise(runtime, 1)
    prefix = torch.zeros((1, 10, 6))
    fast.chunk(dict(batch), noise, (prefix, 4, 10))
    assert fast.constants.misses > 0  # LeRobot does build constants on the host: the first call made them
    fast.constants.misses = 0
    host, syncs = _HostData(), _Syncs()
    run = fast._run

    def watched(*tensors):
        with host, syncs:
            return run(*tensors)

    fast._run = watched  # type: ignore[method-assign]
    fast.runs.clear()
    with mock.patch("torch.cuda.is_current_stream_capturing", return_value=True):
        fast.chunk(dict(batch), noise, (prefix, 4, 10))
    assert fast.constants.misses == 0
    assert host.calls == []
    assert syncs.ops == []
    # Without the cache, LeRobot's own call does copy from the host (the reason it exists).
    baseline = _HostData()
    with baseline, torch.no_grad():
        runtime.policy.predict_action_chunk(dict(batch), noise=noise)
    assert baseline.calls


@pytest.mark.parametrize("policy_type", TYPES)
def test_bf16_is_served_by_the_node_close_to_the_fp32_path(policy_type: str, tiny_checkpoint, tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint("lift", policy_type)
    plain = make_runtime(tmp_path / "fp32", checkpoint)
    fast = make_runtime(tmp_path / "bf16", checkpoint, dtype="bf16")
    extra = fast.contract.extra
    assert extra["fast_path"] is True and extra["trim_tokens"] is True and extra["rtc_max_prefix_rows"] == 50
    assert extra["token_buckets"][-1] == fast.policy_config.tokenizer_max_length
    assert any(parameter.dtype == torch.bfloat16 for parameter in fast.policy.parameters())
    msg = observation(plain.config, 2)
    msg.meta["instruction"] = INSTRUCTIONS[1]
    expected, got = plain.infer("robot-a", msg).actions, fast.infer("robot-a", msg).actions
    normalise = plain.engine.normalise_action.normalise
    a, b = normalise(torch.from_numpy(got)), normalise(torch.from_numpy(expected))
    relative = float((a - b).abs().max() / b.abs().max())
    assert 0 < relative < 2e-2, relative
    # rtc through the fast path: the guided rows follow the prefix.
    prefix = np.ascontiguousarray(expected[3:13])
    msg = observation(plain.config, 3)
    msg.meta["instruction"] = INSTRUCTIONS[0]
    fast.reset("robot-b")
    free = fast.infer("robot-b", msg).actions
    msg.arrays["rtc_prefix"], msg.meta["rtc_delay_rows"] = prefix, 4
    fast.reset("robot-b")
    guided = fast.infer("robot-b", msg).actions
    assert np.abs(guided[:4] - prefix[:4]).mean() < 0.5 * np.abs(free[:4] - prefix[:4]).mean()


def test_smolvlas_patch_positions_without_a_host_sync_are_transformers_own(smolvla: Path, tmp_path: Path) -> None:
    # The engine replaces, on the loaded model only, transformers' SmolVLMVisionEmbeddings.forward, whose boolean-mask
    # write (position_ids[mask] = pos_ids[mask]) syncs with the host on CUDA: same embeddings for any mask.
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionEmbeddings

    runtime = make_runtime(tmp_path, smolvla)
    embeddings = [module for module in runtime.policy.modules() if isinstance(module, SmolVLMVisionEmbeddings)]
    assert len(embeddings) == 1 and "forward" not in vars(embeddings[0])  # LeRobot's plain path: untouched
    module = embeddings[0]
    size = module.image_size
    pixels = torch.randn((2, 3, size, size), generator=torch.Generator().manual_seed(0))
    side = size // module.patch_size
    ones = torch.ones((2, side, side), dtype=torch.bool)
    partial = ones.clone()
    partial[1, side // 2:, :] = False
    partial[1, :, side - 1:] = False
    with torch.no_grad():
        expected = [SmolVLMVisionEmbeddings.forward(module, pixels, mask) for mask in (ones, partial)]
        FastFlowMatching(runtime.policy, _fp32(), torch.device("cpu"), rtc=False)
        assert "forward" in vars(module)
        got = [module(pixel_values=pixels, patch_attention_mask=mask) for mask in (ones, partial)]
        syncs = _Syncs()
        with syncs:
            module(pixel_values=pixels, patch_attention_mask=ones)
    assert syncs.ops == []
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(expected[0], expected[1])  # the partial mask does move positions
    assert not any("forward" in vars(m) for m in make_runtime(tmp_path / "other", smolvla).policy.modules())


def test_compile_and_fast_unet_are_refused_for_a_language_policy(smolvla: Path, tmp_path: Path) -> None:
    from nodes.policy.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"policy\.compile / fast_unet"):
        make_runtime(tmp_path, smolvla, fast_unet=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("policy_type", TYPES)
def test_cuda_graphs_replay_the_chunk_with_rtc_inside(policy_type: str, tiny_checkpoint, tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint("lift", policy_type)
    plain = make_runtime(tmp_path / "plain", checkpoint, device="cuda")
    graphs = make_runtime(tmp_path / "graphs", checkpoint, device="cuda", cuda_graphs=True)
    msg = observation(plain.config, 4)
    msg.meta["instruction"] = INSTRUCTIONS[0]
    expected = plain.infer("robot-a", msg).actions
    graphs.infer("robot-a", msg)  # records every bucket (the node's warm-up)
    engine = graphs.engine.fast
    assert engine.runs and all(run.graph is not None for run in engine.runs.values())  # no capture fell back to eager
    assert all(run.pool is engine.pool for run in engine.runs.values())  # the buckets share one memory pool
    # The captured call, run eagerly under CUDA's sync check: any device-to-host read in it raises (as a capture
    # would refuse it). transformers skips its data-dependent mask checks while a stream captures, as in the capture.
    inputs = [tensor.clone() for tensor in next(iter(engine.runs.values())).graph.inputs]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with mock.patch("torch.cuda.is_current_stream_capturing", return_value=True):
            engine._run(*inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = graphs.infer("robot-a", msg).actions
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
    graphs.reset("robot-a")
    np.testing.assert_array_equal(graphs.infer("robot-a", msg).actions, got)  # a replay replays
    # rtc inside the graph: the same as LeRobot's RTCProcessor on the plain runtime.
    msg.arrays["rtc_prefix"], msg.meta["rtc_delay_rows"] = np.ascontiguousarray(expected[3:13]), 4
    plain.reset("robot-b")
    graphs.reset("robot-b")
    np.testing.assert_allclose(graphs.infer("robot-b", msg).actions, plain.infer("robot-b", msg).actions,
                               rtol=1e-4, atol=1e-3)
    # bf16 with graphs: within the bf16 tolerance of the fp32 path.
    fast = make_runtime(tmp_path / "bf16", checkpoint, device="cuda", cuda_graphs=True, dtype="bf16")
    del msg.arrays["rtc_prefix"], msg.meta["rtc_delay_rows"]
    normalise = plain.engine.normalise_action.normalise
    a = normalise(torch.from_numpy(fast.infer("robot-a", msg).actions).cuda())
    b = normalise(torch.from_numpy(expected).cuda())
    assert float((a - b).abs().max() / b.abs().max()) < 2e-2
    assert fast.engine.describe()["graphs_recorded"] == fast.engine.describe()["token_buckets"]


def test_host_constants_serve_python_data_by_value_and_nothing_else() -> None:
    from nodes.policy.vla_fast import HostConstants

    constants = HostConstants()
    with constants:
        first = torch.tensor([0, 1, 1], dtype=torch.bool, device="cpu")
        again = torch.tensor([0, 1, 1], dtype=torch.bool, device="cpu")
        other = torch.tensor([1, 1, 1], dtype=torch.bool, device="cpu")
        scalar = torch.tensor(1.0, dtype=torch.float32, device="cpu")
        integer = torch.tensor(1, dtype=torch.float32, device="cpu")  # 1 and 1.0 are different keys, same value
        live = torch.zeros(())
        wrapped = torch.tensor([live])  # a tensor in a list: by value each time, never cached
        live.fill_(5)
        rewrapped = torch.tensor([live])
    assert again is first and other is not first and constants.misses == 4
    assert float(scalar) == float(integer) == 1.0
    assert float(wrapped[0]) == 0 and float(rewrapped[0]) == 5
