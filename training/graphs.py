"""CUDA graphs for training without compilation: the eager network's forward and backward
recorded once per input signature and replayed (``run.cuda_graphs: on``).

A small network at a small resolution is bound by kernel launches, not arithmetic: the host
issues hundreds of launches a step while the GPU waits. ``torch.compile(mode=
"reduce-overhead")`` removes them, but compiles one graph per input shape first, and SSD's
Flexi-UNet trains on one shape per resolution pair (seven for ``ssd-64-4l``: minutes of
compilation before a run of a few minutes has started; ``benchmarks/results/ssd-speed.md``).
Here the eager kernels are recorded instead: a few warm-up passes and one capture per
signature, seconds rather than minutes.

Why not ``torch.cuda.make_graphed_callables``, which does the same for one fixed call: it
records in CUDA's global capture mode, in which a CUDA call from any other thread of the
process fails (the DataLoader's pin-memory thread allocates page-locked memory while the
loop records), and it offers no other mode; and it takes one tuple of tensors and replaces the
module's ``forward``, while the loop's network is called with several signatures (resolution
pairs, keyword arguments such as ``out_resolution``, ``labels=None``). So :class:`_Recording`
records a forward and a backward graph in thread-local mode and replays them inside one
autograd node, and :class:`TrainingGraphs` keys each call by its signature, binds its
non-tensor arguments, and records it on first use; every recording shares one memory pool.

Correctness rests on four points:
- A step runs one graph's forward and then its backward before any other graph replays, so
  graphs may share memory: nothing one leaves behind is read after another has run (its
  outputs are read by the loss, its gradients by the optimizer, within the step).
- Autocast runs with its weight cache off (``parts.autocast``), so a graph never reads a
  cast that was freed; the autocast state is part of the signature.
- Random numbers inside the network (dropout) come from PyTorch's graph-safe generator: the
  seed set before each step is honoured, the draws differ from eager's.
- Parameters the signature leaves unused (a Flexi-UNet's other levels) get no gradient, as in
  eager. A parameter's ``.grad`` is the recorded gradient itself, not a copy (a copy per
  parameter would be a launch each, outside the graph), so gradients are not accumulated over
  micro-steps: the loop refuses ``train.grad_accum`` above 1 with graphs.
Without gradients (evaluation), off CUDA, for arguments other than tensors and plain values,
or for a network that cannot be captured (one that waits for the host), the network runs
eagerly; the last with a warning. The backward is recorded outside autocast, as the loop runs
it; two parameters that autograd hands one gradient tensor get a copy each.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten


class _Bound(nn.Module):
    """``net`` with one call's non-tensor arguments fixed: ``forward(*tensors)``."""

    def __init__(self, net: nn.Module, layout: tuple, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.net, self.layout, self.fixed = net, layout, kwargs

    def forward(self, *tensors: Tensor) -> Any:
        it = iter(tensors)
        args = [next(it) if slot is _TENSOR else slot for slot in self.layout[0]]
        kwargs = {k: next(it) if v is _TENSOR else v for k, v in self.layout[1]}
        return self.net(*args, **kwargs, **self.fixed)


_TENSOR = object()  # a tensor's place in a call's layout
_NESTED = object()  # a call with an argument other than a tensor or a plain value


def _signature(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, list[Tensor]]:
    """(hashable key, the call's tensors in order): shapes, strides, dtypes and the other
    arguments' values, with the autocast state."""
    tensors: list[Tensor] = []
    key: list[Any] = []

    def slot(v: Any) -> Any:
        if isinstance(v, Tensor):
            tensors.append(v)
            key.append((tuple(v.shape), v.stride(), v.dtype, v.device, v.requires_grad))
            return _TENSOR
        # a plain value is part of the key; anything else (tensors inside containers are not
        # bound) makes the call run eagerly
        key.append(v if v is None or isinstance(v, (bool, int, float, str)) else _NESTED)
        return v

    layout = (tuple(slot(a) for a in args), tuple((k, slot(v)) for k, v in sorted(kwargs.items())))
    amp = torch.is_autocast_enabled("cuda")
    key.append((amp, torch.get_autocast_dtype("cuda") if amp else None))
    return (tuple(key), layout), tensors


def _capturable(tensors: list[Tensor]) -> bool:
    """A call CUDA graphs can record: tensors, all on CUDA."""
    return bool(tensors) and all(t.is_cuda for t in tensors)


@contextlib.contextmanager
def _recording() -> Iterator[None]:
    """Around a recording: no ``run.sync_debug`` (recording synchronises on purpose; the
    setting is for the steps), and the caller's stream current again after a failed capture
    (``torch.cuda.graph`` leaves its capture stream current when the capture raises) and
    PyTorch's CUDA generator out of its capture state (:func:`_end_failed_capture`)."""
    mode, here = torch.cuda.get_sync_debug_mode(), torch.cuda.current_stream()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    except BaseException:
        torch.cuda.set_stream(here)
        _end_failed_capture()
        raise
    finally:
        torch.cuda.set_stream(here)
        torch.cuda.set_sync_debug_mode(mode)


class TrainingGraphs(nn.Module):
    """``net`` called through CUDA graphs of its forward and backward, one per signature (see
    the module docstring). Checkpoints and EMA keep using ``net`` itself."""

    def __init__(self, net: nn.Module, warmup: int = 3) -> None:
        super().__init__()
        self.net, self.warmup = net, warmup
        self._graphs: dict[tuple, nn.Module] = {}
        self._eager: set[tuple] = set()
        self._pool: Any = None

    def __getattr__(self, name: str) -> Any:  # the network's attributes (num_classes, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("net"), name)

    @property
    def graphs(self) -> int:
        """How many signatures have been recorded."""
        return len(self._graphs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        (key, layout), tensors = _signature(args, kwargs)
        if (not torch.is_grad_enabled() or not _capturable(tensors) or key in self._eager
                or _NESTED in key):
            return self.net(*args, **kwargs)
        if torch.is_autocast_enabled("cuda") and torch.is_autocast_cache_enabled():
            raise RuntimeError("CUDA graphs need autocast without its weight cache "
                               "(torch.autocast(..., cache_enabled=False))")
        key = (*key, self.net.training)
        graphed = self._graphs.get(key)
        if graphed is None:
            try:
                graphed = self._graphs[key] = self._record(layout, tensors)
            except RuntimeError as exc:  # e.g. a network that waits for the host
                self._eager.add(key)
                warnings.warn(f"CUDA graph capture failed, this signature runs eagerly: {exc}",
                              RuntimeWarning, stacklevel=2)
                return self.net(*args, **kwargs)
        return graphed(*tensors)

    def _record(self, layout: tuple, tensors: list[Tensor]) -> Any:
        fixed = {k: v for k, v in layout[1] if v is not _TENSOR}
        tensor_layout = (layout[0], tuple((k, v) for k, v in layout[1] if v is _TENSOR))
        bound = _Bound(self.net, tensor_layout, fixed)
        sample = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with _recording():
            return _record_graphs(bound, sample, self._pool, self.warmup)


def _end_failed_capture() -> None:
    """After a capture that failed, PyTorch's CUDA generator still counts itself as capturing
    (the capture's end, which would tell it, raised first) and every later random draw fails;
    a small capture that succeeds ends that state (one that fails leaves the first error
    to be reported)."""
    with contextlib.suppress(RuntimeError), torch.cuda.graph(
            torch.cuda.CUDAGraph(), capture_error_mode="thread_local"):
        torch.ones(1, device="cuda").add_(1)


def _record_graphs(fn: nn.Module, sample: tuple[Tensor, ...], pool: Any, warmup: int) -> Any:
    """``fn``'s forward and backward on ``sample`` recorded: a callable of tensors like it."""
    return _Recording(fn, sample, pool, warmup)


class _Recording:
    """One signature's forward and backward graphs (thread-local capture mode)."""

    def __init__(self, fn: nn.Module, sample: tuple[Tensor, ...], pool: Any,
                 warmup: int) -> None:
        self.inputs = sample
        named = [(n, p) for n, p in fn.named_parameters() if p.requires_grad]
        self.params = tuple(p for _, p in named)
        # the recording differentiates fresh leaves that share the parameters' storage: a
        # parameter's own gradient node may be alive from an earlier step on another stream,
        # and the backward would make that stream wait on the capture (an error)
        leaves = {n: p.detach().requires_grad_() for n, p in named}
        wrt = [t for t in sample if t.requires_grad] + list(leaves.values())

        def call(*tensors: Tensor) -> Any:
            return torch.func.functional_call(fn, leaves, tensors)

        def diff(out: Any) -> list[Tensor]:
            flat, _ = tree_flatten(out)
            if not all(isinstance(o, Tensor) for o in flat):
                raise RuntimeError("the network returned something other than tensors")
            return [o for o in flat if o.requires_grad]

        here = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(here)
        def backward(outs: list[Tensor], grad_outputs: list[Tensor]) -> list[Tensor | None]:
            # as the loop's backward, outside autocast (the engine would carry it over)
            with torch.autocast("cuda", enabled=False):
                return list(torch.autograd.grad(outs, wrt, grad_outputs, allow_unused=True))

        with torch.cuda.stream(side):  # cuDNN/cuBLAS choices, lazy init: not in the recording
            for _ in range(warmup):
                outs = diff(call(*sample))
                backward(outs, [torch.zeros_like(o) for o in outs])
                del outs  # the warm-up graph freed before the capture
        here.wait_stream(side)
        self.fwd, self.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.fwd, pool=pool, capture_error_mode="thread_local"):
            out = call(*sample)
        outs = diff(out)
        outputs, self.spec = tree_flatten(out)
        self.differentiable = [o.requires_grad for o in outputs]
        self.grad_outputs = [torch.empty_like(o) for o in outs]
        with torch.cuda.graph(self.bwd, pool=pool, capture_error_mode="thread_local"):
            grads = backward(outs, self.grad_outputs)
            seen: set[int] = set()
            for i, g in enumerate(grads):  # autograd may hand two parameters one tensor:
                if g is not None:  # each .grad gets storage of its own (clipping scales
                    ptr = g.untyped_storage().data_ptr()  # in place)
                    grads[i] = g.clone() if ptr in seen else g
                    seen.add(ptr)
        self.outputs = [o.detach() for o in outputs]  # the recorded graph's nodes freed
        it = iter(grads)
        self.grads = tuple([next(it) if t.requires_grad else None for t in sample]
                           + [next(it) for _ in self.params])

    def __call__(self, *tensors: Tensor) -> Any:
        return tree_unflatten(list(_Replay.apply(self, *tensors, *self.params)), self.spec)


class _Replay(torch.autograd.Function):
    """A recording's forward graph, and its backward graph as this node's backward."""

    @staticmethod
    def forward(ctx: Any, rec: _Recording, *args: Tensor) -> tuple[Tensor, ...]:
        ctx.rec = rec
        for static, t in zip(rec.inputs, args, strict=False):  # args end with the parameters
            if static.data_ptr() != t.data_ptr():
                static.copy_(t)
        rec.fwd.replay()
        outs = tuple(o.detach() for o in rec.outputs)
        fixed = [o for o, d in zip(outs, rec.differentiable, strict=True) if not d]
        ctx.mark_non_differentiable(*fixed)
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        rec = ctx.rec
        if any(p.grad is not None for p in rec.params):
            raise RuntimeError("a recorded backward needs every .grad None before it "
                               "(zero_grad(set_to_none=True), no accumulation)")
        for static, g in zip(rec.grad_outputs,
                             [g for g, d in zip(grads, rec.differentiable, strict=True) if d],
                             strict=True):
            static.copy_(g)
        rec.bwd.replay()
        return (None, *(None if g is None else g.detach() for g in rec.grads))


def use_training_graphs(net: nn.Module) -> TrainingGraphs:
    """``net`` wrapped in :class:`TrainingGraphs` (a wrapped network is returned as is)."""
    return net if isinstance(net, TrainingGraphs) else TrainingGraphs(net)
