"""Small pieces of the training loop: distributed context, device, precision, learning rate,
EMA, per-step seeds. Each is a plain function so that ``training.loop`` reads top to bottom."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from common.run_config import Config


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    local_rank: int


def distributed_context() -> DistContext:
    """Rank and world size: an existing process group (Ray Train), torchrun's environment
    (initialises the group), or a single process."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return DistContext(dist.get_rank(), dist.get_world_size(), local)
    return DistContext(0, 1, 0)


def pick_device(cfg: Config, ctx: DistContext) -> torch.device:
    if cfg.run.device == "cpu" or (cfg.run.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("run.device is 'cuda' but no CUDA device is available")
    torch.cuda.set_device(ctx.local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def switch(value: str, device: torch.device) -> bool:
    """'on' / 'off' / 'auto' (on exactly on CUDA)."""
    return value == "on" or (value == "auto" and device.type == "cuda")


def compile_blocks(net: nn.Module, mode: str) -> int:
    """Compile in place each block of ``net`` whose class a network in it names in its
    ``COMPILE_UNITS`` (``nn.Module.compile``: state-dict keys unchanged), static shapes; the
    rest of the forward stays eager. Blocks of one class and shape share their compiled code,
    so a network run at several input sizes (SSD's Flexi-UNet, one size per resolution pair)
    compiles each block shape once instead of one whole graph per size. Returns the number of
    blocks compiled."""
    units = tuple({u for m in net.modules() for u in getattr(type(m), "COMPILE_UNITS", ())})
    if not units:
        raise ValueError(f"{type(net).__name__} names no COMPILE_UNITS: "
                         "run.compile_scope=blocks needs them (use run.compile_scope=model)")
    blocks = [m for m in net.modules() if isinstance(m, units)]
    for m in blocks:
        m.compile(dynamic=False, mode=mode)
    return len(blocks)


def autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (precision auto/bf16), full precision otherwise. With
    ``run.cuda_graphs`` on, autocast keeps no cache of cast weights (a recorded graph would
    read a cast freed after its recording)."""
    p = cfg.run.precision
    if p == "bf16" or (p == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16,
                              cache_enabled=cfg.run.cuda_graphs == "off")
    return contextlib.nullcontext()


def learning_rate(cfg: Config, images_seen: int) -> float:
    """Linear warm-up over ``warmup_images``, then constant or cosine decay to 0."""
    o = cfg.optim
    if o.warmup_images and images_seen < o.warmup_images:
        return o.lr * (images_seen + cfg.train.batch_size) / o.warmup_images
    if o.decay == "cosine":
        span = max(cfg.train.total_images - o.warmup_images, 1)
        frac = min((images_seen - o.warmup_images) / span, 1.0)
        return 0.5 * o.lr * (1.0 + math.cos(math.pi * frac))
    return o.lr


def make_optimizer(cfg: Config, groups: list[dict], device: torch.device) -> torch.optim.AdamW:
    o = cfg.optim
    fused = switch(o.fused, device)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps,
                             weight_decay=o.weight_decay, fused=fused or None)


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, step: int, cfg: Config) -> None:
    """ema <- d ema + (1 - d) net, d = min(ema_decay, (1 + k) / (10 + k)) with warm-up."""
    d = cfg.optim.ema_decay
    if cfg.optim.ema_warmup:
        d = min(d, (1.0 + step) / (10.0 + step))
    e_params, n_params = list(ema.parameters()), list(net.parameters())
    torch._foreach_lerp_(e_params, n_params, 1.0 - d)
    for eb, nb in zip(ema.buffers(), net.buffers(), strict=True):
        eb.copy_(nb)


def step_seed(seed: int, step: int, slot: int) -> int:
    """The seed of micro-batch ``slot`` (rank * grad_accum + micro step) of ``step``: the
    noise of a micro-batch depends on its place in the global batch, not on the process."""
    return int(np.random.SeedSequence([seed, step, slot]).generate_state(1, np.uint64)[0] >> 1)


def crossed(images_seen: int, batch: int, every: int) -> bool:
    """True when this step's images crossed a multiple of ``every``."""
    return every > 0 and (images_seen // every) > ((images_seen - batch) // every)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # deferred: resource is Unix only, and only the CPU path reads it
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def all_mean(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= ctx.world
    return x


def step_flops_per_image(objective: Any, net: nn.Module, batch: dict, cfg: Config,
                         device: torch.device, n: int = 2) -> float:
    """Training FLOPs per image of one step: forward and backward of ``objective`` on the
    first ``n`` images of ``batch`` with the eager ``net``, counted by
    ``torch.utils.flop_counter`` (matrix products and convolutions), divided by ``n``.
    Attention runs through SDPA's math kernel here, so that its products are counted whatever
    fused kernel (some of which the counter does not know) the device would pick. An objective
    whose cost varies from step to step (SSD's resolution pairs) names its cases and their
    probabilities (``flop_cases``): the count is their expectation.

    Measured by the loop rather than declared by the model, so that an equal-compute
    comparison rests on what each run did. The gradients it leaves are cleared. Blocks
    compiled in place (``compile_blocks``) run eagerly here: met first under the counter's
    dispatch mode, torch.compile would leave them eager for the whole run.
    """
    size = batch["images"].shape[0]
    n = min(n, size)
    part = {k: v[:n].clone() if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == size
            else v for k, v in batch.items()}
    cases = objective.flop_cases() if hasattr(objective, "flop_cases") \
        else [(1.0, contextlib.nullcontext())]
    total = 0.0
    for weight, case in cases:
        with torch.compiler.set_stance("force_eager"), case, \
                FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            with autocast(cfg, device):
                loss, _ = objective(net, part)
            loss.backward()
        net.zero_grad(set_to_none=True)
        total += weight * counter.get_total_flops()
    return total / n


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (so that a wall clock read after it is exact)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def watch_syncs(cfg: Config, device: torch.device, on: bool) -> None:
    """``run.sync_debug`` on (inside a training step) or off (logging, checkpoints)."""
    if device.type == "cuda" and cfg.run.sync_debug != "off":
        torch.cuda.set_sync_debug_mode(cfg.run.sync_debug if on else "default")


def crossed_any(before: float, after: float, marks: list[float] | tuple[float, ...]) -> bool:
    """True when a mark lies in (before, after]: a count passed it this step."""
    return any(before < m <= after for m in marks)


class TrainingClock:
    """Training seconds: the wall time of the steps, leaving out each process's first step
    (compilation, allocator warm-up; kept as ``first_step_s``) and whatever runs
    :meth:`paused` (checkpoints, snapshots, sample grids). Queued device work is waited for
    before a pause, so it is counted as training."""

    def __init__(self, device: torch.device, seconds: float = 0.0) -> None:
        self.device, self.seconds = device, seconds
        self.first_step_s: float | None = None
        self._start = time.perf_counter()
        self._from: float | None = None

    def step_done(self) -> None:
        now = time.perf_counter()
        if self._from is None:
            synchronize(self.device)
            now = time.perf_counter()
            self.first_step_s = now - self._start
        else:
            self.seconds += now - self._from
        self._from = now

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        synchronize(self.device)
        if self._from is not None:
            self.seconds += time.perf_counter() - self._from
        try:
            yield
        finally:
            if self._from is not None:
                self._from = time.perf_counter()
