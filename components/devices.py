"""Host-to-device copies that leave the device's queue running.

``t.to("cuda")`` of a tensor in pageable host memory does not return until everything queued
on the stream has run (PyTorch copies synchronously unless the source is page-locked and
``non_blocking=True``). Once per training step that empties the GPU's queue: the next kernels
wait for the host to launch them. Two cases occur per step: a constant table (a schedule's
knots) used on the device, kept here one copy per device; and a small tensor made on the host
(labels, a step drawn on the host), copied from page-locked memory without waiting.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """``t`` on ``device``, queued behind the stream's work instead of waiting for it.

    A host tensor bound for CUDA goes through page-locked memory (pinned here unless it already
    is, as a DataLoader with ``pin_memory`` leaves it); PyTorch keeps that memory until the
    copy has run. Any other move is ``t.to(device)``.
    """
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    if not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def cached_on(t: Tensor, device: torch.device | str, cache: dict[str, Tensor]) -> Tensor:
    """A constant ``t`` on ``device``, copied once per device into ``cache`` (its owner's)."""
    device = torch.device(device)
    if t.device == device:
        return t
    key = str(device)
    if key not in cache:
        cache[key] = to_device(t, device)
    return cache[key]
