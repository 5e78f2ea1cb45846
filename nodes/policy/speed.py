"""Speed paths of the policy node that keep LeRobot's modules and weights: the speed options from the
config, Conv1d as matrix products (batch 1), CUDA graph recording with an eager fallback, and the
persistent compile cache that lets a restarted node skip most of torch.compile's work.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from common.config import PolicyConfig

log = logging.getLogger(__name__)


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


class GraphPool:
    """One CUDA graph memory pool shared by graphs that replay one at a time (``torch.cuda.graph_pool_handle``).

    Each capture otherwise gets a private pool holding its intermediates (a VLA's KV cache and activations) for
    good: N buckets cost N times the memory. Graphs that never run concurrently (one engine's buckets, replayed
    one after another from one thread) may share one pool, provided each graph's outputs are consumed (cloned)
    before another graph of the pool replays: a later capture may reuse the memory an earlier one freed.
    """

    def __init__(self) -> None:
        self._handle: Any = None

    def handle(self) -> Any:
        if self._handle is None:
            self._handle = torch.cuda.graph_pool_handle()
        return self._handle


class CudaGraph:
    """``fn`` recorded once as a CUDA graph on static input buffers; calling it replays the recording.

    The returned tensors are the graph's static outputs: they are overwritten by the next call (of this graph,
    or of any graph sharing its ``pool``), so callers consume or clone them first.
    """

    def __init__(self, fn: Callable[..., Any], example_inputs: list[Tensor], warmup: int = 2,
                 pool: GraphPool | None = None) -> None:
        self.inputs = [tensor.clone() for tensor in example_inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # lets torch.compile and cuDNN settle before recording
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=None if pool is None else pool.handle()):
            self.outputs = fn(*self.inputs)

    def __call__(self, *inputs: Tensor) -> Any:
        for buffer, value in zip(self.inputs, inputs, strict=True):
            buffer.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.outputs


class MaybeGraphed:
    """``fn`` run eagerly, or recorded as a CUDA graph on its first call and replayed afterwards.

    If recording fails (a model doing something a capture cannot hold, e.g. a host sync) it logs why and
    stays eager. ``pool``: the memory pool it shares with graphs that never replay concurrently with it.
    """

    def __init__(self, fn: Callable[..., Any], name: str, enabled: bool, pool: GraphPool | None = None) -> None:
        self.fn = fn
        self.name = name
        self.enabled = enabled
        self.pool = pool
        self.graph: CudaGraph | None = None

    def __call__(self, *inputs: Tensor) -> Any:
        if not self.enabled:
            return self.fn(*inputs)
        if self.graph is None:
            try:
                self.graph = CudaGraph(self.fn, list(inputs), pool=self.pool)
            except RuntimeError as exc:
                log.warning("CUDA graph of %s could not be recorded (%s); running it eagerly", self.name,
                            str(exc).splitlines()[0])
                self.enabled = False
                torch.cuda.synchronize()
                return self.fn(*inputs)
        return self.graph(*inputs)


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # batch sizes that get a CUDA graph of their own (policy.max_batch caps them)


def batch_bucket(size: int) -> int:
    """The smallest bucket that holds ``size`` rows (``size`` itself beyond the largest)."""
    return next((bucket for bucket in BATCH_BUCKETS if bucket >= size), size)


def pad_rows(tensor: Tensor, rows: int) -> Tensor:
    """``tensor`` with its last row repeated along dim 0 up to ``rows`` rows (the padding is computed and dropped)."""
    missing = rows - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])


class BucketedGraphs:
    """``fn`` over a batch (dim 0 of every input and of the output), eager at the batch's own size, or with
    CUDA graphs: one recording per batch-size bucket (``BATCH_BUCKETS``), the batch padded to its bucket by
    repeating its last row and the output cut back to the batch. A graph's shapes are fixed, so one graph
    per bucket keeps the recordings few while any batch size up to ``policy.max_batch`` replays one.
    The buckets share one memory pool (``pool``, or one of their own): the output is a view of the graph's
    static buffer, consume or clone it before the next call of any graph of that pool.
    """

    def __init__(self, fn: Callable[..., Tensor], name: str, enabled: bool, pool: GraphPool | None = None) -> None:
        self.fn = fn
        self.name = name
        self.enabled = enabled
        self.pool = pool or GraphPool()
        self.graphs: dict[int, MaybeGraphed] = {}

    def __call__(self, *inputs: Tensor) -> Tensor:
        if not self.enabled:
            return self.fn(*inputs)
        size = int(inputs[0].shape[0])
        bucket = batch_bucket(size)
        graph = self.graphs.get(bucket)
        if graph is None:
            graph = self.graphs[bucket] = MaybeGraphed(self.fn, f"{self.name} (batch {bucket})", True, self.pool)
        out: Tensor = graph(*(pad_rows(tensor, bucket) for tensor in inputs))
        return out[:size]


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


def use_compile_cache(directory: Path) -> str:
    """Keep torch.compile's caches in ``directory`` (``policy.compile_cache``), across restarts and reboots.

    Why: a restarted node with ``policy.compile`` would otherwise pay Inductor's code generation and
    Triton's kernel compilation again (tens of seconds on the GPU). With the FX graph cache and the
    AOTAutograd cache on, the second start still traces the model with Dynamo but loads the generated
    code and the compiled kernels from disk. torch's default place is ``/tmp/torchinductor_<user>``,
    which a reboot or a tmp cleaner empties; ``run/compile-cache`` stays with the deployment. Triton's
    kernels go under the same directory unless ``TRITON_CACHE_DIR`` is set. An operator's own
    ``TORCHINDUCTOR_CACHE_DIR`` wins over the config. Returns a one-line description for the log.
    """
    import torch._functorch.config
    import torch._inductor.config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    from torch._inductor.utils import clear_caches

    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    # torch itself writes its default into the variable the first time it asks (LeRobot's imports may have):
    # only a different value is an operator's choice.
    operator = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
    if operator and operator != default_cache_dir():
        log.info("TORCHINDUCTOR_CACHE_DIR=%s is set; using it instead of policy.compile_cache (%s)", operator,
                 directory)
        path = Path(operator)
    else:
        path = Path(directory)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
        clear_caches()  # as torch's own temporary_cache_dir() does: nothing keeps a path to the old directory
    path.mkdir(parents=True, exist_ok=True)
    entries = sum(1 for item in path.rglob("*") if item.is_file())
    return f"{path} ({'warm: ' + str(entries) + ' files' if entries else 'cold: empty, this start fills it'})"
