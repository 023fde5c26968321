"""Reading pictures and maps safely, and encoding results: the only module that touches image files."""

import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import InputError
from .limits import MAX_INPUT_BYTES, MAX_INPUT_PIXELS

log = logging.getLogger(__name__)

READABLE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""Formats decoded in-process by Pillow; others (EPS via Ghostscript, for one) are refused."""

OUTPUT_FORMATS = ("webp", "png", "jpg")

Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

ROTATED_ORIENTATIONS = (5, 6, 7, 8)
"""EXIF orientations that display the picture turned by 90 degrees: width and height swap."""


def _open_header(path: Path, name: str) -> Image.Image:
    """Open a picture without decoding it, refusing empty, oversized and unreadable files and bombs."""
    if path is None:
        raise InputError(f"{name}: required; give a picture file (PNG, JPEG, WebP, GIF, BMP or TIFF)")
    path = Path(path)
    size_bytes = os.path.getsize(path)
    if size_bytes == 0:
        raise InputError(f"{name}: the file is empty")
    if size_bytes > MAX_INPUT_BYTES:
        raise InputError(f"{name}: the file is {size_bytes / 2**20:.0f} MiB; at most {MAX_INPUT_BYTES // 2**20} MiB")
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1x and 2x its limit; the explicit check below refuses those with a clear error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            picture = Image.open(path, formats=READABLE_FORMATS)
    except Image.DecompressionBombError:
        raise InputError(f"{name}: larger than {MAX_INPUT_PIXELS:,} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputError(f"{name}: not a readable picture; allowed: PNG, JPEG, WebP, GIF, BMP, TIFF") from None
    width, height = picture.size
    if width * height > MAX_INPUT_PIXELS:
        picture.close()
        raise InputError(f"{name}: {width}x{height} is larger than {MAX_INPUT_PIXELS:,} pixels")
    return picture


def picture_size(path: Path, name: str = "image") -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation applied), read from the header alone: cheap before a decode."""
    with _open_header(path, name) as picture:
        width, height = picture.size
        try:
            orientation = picture.getexif().get(ExifTags.Base.Orientation)
        except (OSError, SyntaxError, ValueError, EOFError):
            orientation = None  # a broken EXIF block is reported when the picture is decoded
    return (height, width) if orientation in ROTATED_ORIENTATIONS else (width, height)


def _open(path: Path, name: str) -> Image.Image:
    """Open and decode the first frame, upright; bombs are refused from the header before any large allocation."""
    picture = _open_header(path, name)
    if getattr(picture, "n_frames", 1) > 1:
        log.warning("%s: animated or multi-page file, using its first frame", name)
    try:
        picture.load()
        return ImageOps.exif_transpose(picture)
    except Image.DecompressionBombError:
        raise InputError(f"{name}: larger than {MAX_INPUT_PIXELS:,} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise InputError(f"{name}: the file is truncated or corrupt") from None


def _sixteen_bit_to_unit(picture: Image.Image) -> np.ndarray:
    return np.clip(np.asarray(picture, dtype=np.float32) / 65535.0, 0.0, 1.0)


def read_image(path: Path, name: str = "image") -> np.ndarray:
    """Decode a picture to RGB uint8 (H, W, 3), upright, whatever its mode (alpha is flattened onto white)."""
    picture = _open(path, name)
    if picture.mode in SIXTEEN_BIT_MODES:
        gray = np.round(_sixteen_bit_to_unit(picture) * 255.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if picture.mode == "F":
        gray = np.clip(np.round(np.asarray(picture, dtype=np.float32)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if (picture.mode == "P" and "transparency" in picture.info) or picture.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        log.warning("%s: transparent areas flattened onto white", name)
        rgba = picture.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat.alpha_composite(rgba)
        picture = flat
    return np.asarray(picture.convert("RGB"))


def read_map(path: Path, name: str = "map") -> np.ndarray:
    """Decode a change map to float32 (H, W) in [0, 1]: luminance, times alpha where there is one."""
    picture = _open(path, name)
    if picture.mode in SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_unit(picture)
    if picture.mode == "F":
        return np.clip(np.asarray(picture, dtype=np.float32), 0.0, 1.0)
    if picture.mode == "P":
        picture = picture.convert("RGBA" if "transparency" in picture.info else "RGB")
    if "A" in picture.getbands():
        luminance_alpha = np.asarray(picture.convert("LA"), dtype=np.float32) / 255.0
        return luminance_alpha[:, :, 0] * luminance_alpha[:, :, 1]
    return np.asarray(picture.convert("L"), dtype=np.float32) / 255.0


def encode_image(pixels: np.ndarray, output_format: str, quality: int) -> bytes:
    """Encode RGB uint8 (H, W, 3), with settings that keep encoding far cheaper than the GPU work."""
    picture = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if output_format == "png":
        picture.save(buffer, format="PNG", compress_level=1)
    elif output_format == "jpg":
        picture.save(buffer, format="JPEG", quality=quality)
    elif output_format == "webp":
        picture.save(buffer, format="WEBP", quality=quality, method=2)
    else:
        raise InputError(f"output_format: {output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    return buffer.getvalue()


def write_outputs(images: list[np.ndarray], folder: Path, output_format: str, quality: int) -> list[Path]:
    """Write each result as folder/out-N.<format>."""
    paths = []
    for index, pixels in enumerate(images):
        path = Path(folder) / f"out-{index}.{output_format}"
        path.write_bytes(encode_image(pixels, output_format, quality))
        paths.append(path)
    return paths
