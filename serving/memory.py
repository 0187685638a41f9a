"""How much device memory a generation will take, estimated before it runs, so that the
service refuses a request (413) or splits a batch of requests (:func:`split_under_cap`)
instead of failing on the device.

The estimate measures each network once, with forward hooks on a single native-resolution
pass (the live activations' bound per pixel, and the attention score matrices' per pixel
squared), and scales that to a request's images, resolution and guidance.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from components.model import GenerativeModel

_ACTIVATIONS: weakref.WeakKeyDictionary[nn.Module, tuple[float, float]] = (
    weakref.WeakKeyDictionary()
)


def _activation_profile(model: GenerativeModel) -> tuple[float, float]:
    """(floats per pixel, attention floats per pixel^2) for one image, measured once.

    One forward pass at the native resolution with hooks on the leaf modules: the sum of
    their outputs bounds the live activations of an inference pass from above; attention
    modules add ``heads * (H W)^2`` for the score matrix (quadratic in the pixel count).
    """
    net = getattr(model.net, "unwrapped", model.net)  # a CUDA-graph wrapper's own network
    if net in _ACTIVATIONS:
        return _ACTIVATIONS[net]
    r = model.resolution
    linear, quad = [0.0], [0.0]

    def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            linear[0] += out.numel()
        if "attention" in type(mod).__name__.lower() and isinstance(_inp[0], Tensor):
            x = _inp[0]
            hw = x.shape[-1] * x.shape[-2] if x.ndim == 4 else x.shape[-2]
            quad[0] += getattr(mod, "num_heads", 1) * hw**2

    mods = [m for m in net.modules() if not list(m.children())
            or "attention" in type(m).__name__.lower()]
    handles = [m.register_forward_hook(hook) for m in mods]
    p = next(net.parameters(), torch.zeros(()))
    try:
        x = torch.zeros(1, model.in_channels, r, r, device=p.device, dtype=p.dtype)
        c = torch.zeros(1, model.n_cond, device=p.device, dtype=p.dtype)
        labels = torch.zeros(1, dtype=torch.long, device=p.device) if model.num_classes else None
        with torch.no_grad():
            net(x, c, labels)
    finally:
        for h in handles:
            h.remove()
    pixels = float(r * r)
    prof = (linear[0] / pixels, quad[0] / pixels**2)
    _ACTIVATIONS[net] = prof
    return prof


_PARAM_BYTES: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def _parameter_bytes(net: nn.Module) -> int:
    """Bytes of ``net``'s parameters, counted once per network (a service asks per request)."""
    if net not in _PARAM_BYTES:
        _PARAM_BYTES[net] = sum(p.numel() * p.element_size() for p in net.parameters())
    return _PARAM_BYTES[net]


def memory_estimate_bytes(model: GenerativeModel, *, n_images: int, resolution: int | None = None,
                          cfg_scale: float = 1.0, upscale: str = "ug",
                          bytes_per_float: int = 4) -> int:
    """A conservative estimate of the peak memory of one ``generate`` call (bytes).

    Parameters + (images through the network at once) x activations(resolution).
    Classifier-free guidance doubles the network batch; upsample guidance adds a pass on
    1/m^2 of the pixels. Used to refuse requests over a cap before running them.
    """
    res = resolution or model.resolution
    m = res // model.resolution
    per_px, per_px2 = _activation_profile(model)
    pixels = float(res * res)
    act = per_px * pixels + per_px2 * pixels**2  # floats for one image at full resolution
    batch = n_images * (2 if cfg_scale != 1.0 else 1)
    if m > 1 and upscale == "ug":
        low = pixels / m**2
        act += per_px * low + per_px2 * low**2
    params = _parameter_bytes(model.net)
    state = 4 * n_images * model.in_channels * pixels  # x, prediction, noise, output
    return int(params + bytes_per_float * (batch * act + state))


def split_under_cap(model: GenerativeModel, n_images: list[int], *, resolution: int,
                    cfg_scale: float, upscale: str, cap_bytes: int) -> list[list[int]]:
    """Consecutive requests of ``n_images`` images each (one setting, one resolution) grouped
    so that each group's generate call stays under ``cap_bytes``: lists of positions in
    ``n_images``, in order. A request over the cap on its own gets a group of its own."""
    groups: list[list[int]] = []
    cur: list[int] = []
    n = 0
    for i, k in enumerate(n_images):
        need = memory_estimate_bytes(model, n_images=n + k, resolution=resolution,
                                     cfg_scale=cfg_scale, upscale=upscale)
        if cur and need > cap_bytes:
            groups.append(cur)
            cur, n = [], 0
        cur.append(i)
        n += k
    return groups + [cur]
