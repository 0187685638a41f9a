"""CUDA graphs for sampling: a backbone's forward pass replayed as one graph launch.

A sampler calls the network once per step with the same shapes, and a small network at a
small resolution is launch-bound on a large GPU: a call of one image costs what a call of 32
does, and the host CPU, not the GPU, sets the pace (hundreds of kernel launches per step).
:class:`GraphedBackbone` records ``net(x, c_noise, class_labels)`` once per input signature
and batch-size bucket into a CUDA graph and replays it: one launch per step.

- Batches are padded up to the next bucket (1, 2, 4, ... 256); the padding rows are zeros and
  every backbone here treats images independently (group norm, attention within an image),
  so a real image's output does not depend on them.
- Only inference: with gradients enabled, on CPU, for a batch above the largest bucket, or
  for inputs of another device, it calls the network directly.
- Autocast: the graph is recorded under the caller's autocast state (part of the signature),
  with autocast's weight cache off, so the graph never reads a cast that has been freed.
- The graphs share one memory pool; each replay's output is copied out before returning.
- A network that cannot be captured (one that synchronises with the host, say) runs eagerly
  for that input signature, with a warning: slower, never wrong.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: Tensor
    c_noise: Tensor
    labels: Tensor | None
    out: Tensor


class GraphedBackbone(nn.Module):
    """``net(x, c_noise, class_labels)`` through CUDA graphs (see the module docstring)."""

    def __init__(self, net: nn.Module, buckets: tuple[int, ...] = BUCKETS,
                 warmup: int = 2) -> None:
        super().__init__()
        if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"buckets must be increasing positive sizes, got {buckets}")
        self.net, self.buckets, self.warmup = net, tuple(buckets), warmup
        self._graphs: dict[tuple, _Graph] = {}
        self._eager: set[tuple] = set()  # signatures whose capture failed: run eagerly
        self._pool = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str):  # the wrapped network's attributes (num_classes, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("net"), name)

    @property
    def unwrapped(self) -> nn.Module:
        """The network itself (for hooks, profiling, saving)."""
        return self.net

    @property
    def graphs(self) -> int:
        """How many graphs have been recorded."""
        return len(self._graphs)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        n = x.shape[0]
        if (torch.is_grad_enabled() or not x.is_cuda or n > self.buckets[-1]
                or c_noise.device != x.device
                or (class_labels is not None and class_labels.device != x.device)):
            return self.net(x, c_noise, class_labels)
        size = next(b for b in self.buckets if b >= n)
        amp = torch.is_autocast_enabled("cuda")
        key = (size, tuple(x.shape[1:]), x.dtype, tuple(c_noise.shape[1:]), c_noise.dtype,
               None if class_labels is None else class_labels.dtype, x.device, amp,
               torch.get_autocast_dtype("cuda") if amp else None)
        with self._lock:
            if key in self._eager:
                return self.net(x, c_noise, class_labels)
            g = self._graphs.get(key)
            if g is None:
                try:
                    g = self._graphs[key] = self._record(key, x, c_noise, class_labels, size)
                except RuntimeError as exc:  # e.g. a network that syncs with the host
                    self._eager.add(key)
                    warnings.warn(f"CUDA graph capture failed, running this input signature "
                                  f"eagerly: {exc}", RuntimeWarning, stacklevel=2)
                    torch.cuda.synchronize(x.device)
                    return self.net(x, c_noise, class_labels)
            g.x[:n].copy_(x)
            g.c_noise[:n].copy_(c_noise)
            if class_labels is not None:
                g.labels[:n].copy_(class_labels)
            g.graph.replay()
            return g.out[:n].clone()

    def _record(self, key: tuple, x: Tensor, c_noise: Tensor, labels: Tensor | None,
                size: int) -> _Graph:
        amp, amp_dtype = key[-2], key[-1]
        sx = torch.zeros((size, *x.shape[1:]), dtype=x.dtype, device=x.device)
        sc = torch.zeros((size, *c_noise.shape[1:]), dtype=c_noise.dtype, device=x.device)
        sl = None if labels is None else torch.zeros(size, dtype=labels.dtype, device=x.device)

        def run() -> Tensor:
            with torch.autocast("cuda", dtype=amp_dtype or torch.bfloat16, enabled=amp,
                                cache_enabled=False):
                return self.net(sx, sc, sl)

        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up off the capture (cuDNN/cuBLAS choices, lazy init)
            for _ in range(self.warmup):
                run()
        torch.cuda.current_stream(x.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = run()
        return _Graph(graph, sx, sc, sl, out)


def use_cuda_graphs(net: nn.Module) -> nn.Module:
    """``net`` wrapped in :class:`GraphedBackbone` (once; a wrapped network is returned as is)."""
    return net if isinstance(net, GraphedBackbone) else GraphedBackbone(net)
