"""Validating, converting and resizing one input image for ingest.

``prepare_image(data, size, max_pixels) -> (ext, bytes, width, height)`` or raises
``BadImage(reason)``. Convertible inputs are converted to 8-bit RGB (grayscale, RGBA and LA
composited over white, palette, CMYK, 16-bit); images already RGB at the target size keep
their original JPEG/PNG bytes; everything else is stored as lossless PNG.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False
KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png"}


class BadImage(ValueError):
    """An input that cannot become a sample; the message is the recorded reason."""


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (alpha composited over white; 16-bit scaled, not clipped)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        if im.mode == "F" and a.max() <= 1.0:
            top = 1.0
        a8 = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _fit(im: Image.Image, size: int) -> Image.Image:
    """Center-crop to a square, then anti-aliased (Lanczos) resize to size x size."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    return im if side == size else im.resize((size, size), Image.Resampling.LANCZOS)


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


ORIENTATION_TAG = 0x0112  # EXIF Orientation


def _pad(im: Image.Image, size: int) -> Image.Image:
    """Center an image no larger than ``size`` in each side on a black ``size`` square (a side
    above ``size`` is center-cropped first)."""
    w, h = im.size
    cw, ch = min(w, size), min(h, size)
    left, top = (w - cw) // 2, (h - ch) // 2
    im = im.crop((left, top, left + cw, top + ch))
    canvas = Image.new("RGB", (size, size))
    canvas.paste(im, ((size - cw) // 2, (size - ch) // 2))
    return canvas


def prepare_image(data: bytes | np.ndarray, size: int | None, max_pixels: int,
                  small: str = "reject") -> tuple[str, bytes, int, int]:
    """One input -> (ext, stored bytes, width, height); raises BadImage with the reason.

    ``small``: what happens to an image whose shorter side is below ``size`` ("reject",
    "upscale" or "pad"; see ``IngestConfig.small``)."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim not in (2, 3):
            raise BadImage(f"array input: expected uint8 (H, W[, C]), got {data.dtype} "
                           f"{data.shape}")
        im, original = Image.fromarray(data), None
    else:
        if len(data) == 0:
            raise BadImage("empty file: zero bytes")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadImage(f"decompression bomb: {exc}") from None
        except UnidentifiedImageError:
            raise BadImage("not a decodable image: unknown format or not an image") from None
        original = data
    w, h = im.size
    frames = getattr(im, "n_frames", 1)
    if frames > 1:  # recorded, never a silent choice of one frame
        raise BadImage(f"animated image ({frames} frames): only still images are ingested")
    if w * h > max_pixels:
        raise BadImage(f"decompression bomb: {w}x{h} = {w * h} pixels > max_pixels "
                       f"{max_pixels}")
    try:
        im.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"truncated or corrupt image: {exc}") from None
    too_small = size is not None and min(w, h) < size
    if too_small and small == "reject":
        raise BadImage(f"smaller than target size: {w}x{h} < {size}x{size} "
                       "(--small upscale or pad keeps such images)")
    # EXIF orientation (a phone's portrait JPEG is stored sideways with a rotate tag): the
    # pixels are turned upright, and such a file is re-encoded, never kept as it was
    orientation = im.getexif().get(ORIENTATION_TAG, 1) if original is not None else 1
    if orientation not in (0, 1):
        fmt = im.format
        im = ImageOps.exif_transpose(im)
        im.format = fmt
        w, h = im.size
    keep = original is not None and orientation in (0, 1) and im.mode == "RGB" and \
        im.format in KEEP_FORMATS and (size is None or (w, h) == (size, size))
    if keep:
        return KEEP_FORMATS[im.format], original, w, h
    rgb = _to_rgb(im)
    if too_small and small == "pad":
        rgb = _pad(rgb, size)
    elif size is not None:
        rgb = _fit(rgb, size)
    return "png", _png(rgb), rgb.size[0], rgb.size[1]
