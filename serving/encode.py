"""PNG encoding of uint8 images (NHWC) for HTTP responses and files."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

from components.generate import image_grid


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, C) uint8 with C in {1, 3, 4} -> PNG bytes."""
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected (H, W, C) uint8, got {image.shape} {image.dtype}")
    arr = image[..., 0] if image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def png_base64(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def grid_png(images: np.ndarray, nrow: int | None = None) -> bytes:
    """(N, H, W, C) uint8 -> one PNG with the images in a grid (white padding)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, 1).float()  # (N, C, H, W)
    grid = image_grid(x, nrow=nrow, pad_value=255.0)  # (C, H', W') in 0..255
    return png_bytes(grid.movedim(0, -1).to(torch.uint8).numpy())
