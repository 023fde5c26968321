"""Reading pictures and maps safely: the only code that decodes picture files.

Formats come from an allow-list (no Ghostscript; pillow-heif for HEIC), and sizes are checked from the header
before anything large is decoded.
"""

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pillow_heif
from PIL import ExifTags, Image, ImageCms, ImageOps

from ..errors import InputError
from ..limits import MAX_INPUT_BYTES, MAX_INPUT_PIXELS
from . import colour
from .boxes import avif_nclx, largest_item
from .colour import ColourSpace
from .metadata import OutputMetadata, detached_exif, output_exif, output_xmp

log = logging.getLogger(__name__)

pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)

READABLE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF")
"""Formats decoded in-process (HEIF by pillow-heif, the rest by Pillow); others (EPS via Ghostscript) are refused."""

READABLE_NAMES = "PNG, JPEG, WebP, GIF, BMP, TIFF, HEIC, AVIF"

Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
GRAY_MODES = ("1", "L", "LA", "La", "F", *SIXTEEN_BIT_MODES)
RGB_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "YCbCr")

ROTATED_ORIENTATIONS = (5, 6, 7, 8)
"""EXIF orientations that display the picture turned by 90 degrees: width and height swap."""


@dataclass(frozen=True, eq=False)
class Picture:
    """A decoded input picture: pixels in its own colour space, the way to sRGB and back, and what outputs carry."""

    pixels: np.ndarray
    """RGB uint8 (H, W, 3), upright, in colour_space; transparent areas flattened onto white."""
    colour_space: ColourSpace
    metadata: OutputMetadata
    alpha: np.ndarray | None = None
    """Opacity uint8 (H, W), upright, for a picture with an alpha channel or a transparent palette entry."""


@dataclass(frozen=True)
class _Decoded:
    image: Image.Image
    """Upright and loaded."""
    exif: Image.Exif
    """As in the file, Orientation included."""
    format: str


def _open_header(path: Path, name: str) -> Image.Image:
    """Open a picture without decoding it, refusing empty, oversized and unreadable files and bombs."""
    if path is None:
        raise InputError(f"{name}: required; give a picture file ({READABLE_NAMES})")
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
    except Exception:  # UnidentifiedImageError, or any error of a plugin reading a hostile header
        raise InputError(f"{name}: not a readable picture; allowed: {READABLE_NAMES}") from None
    width, height = picture.size
    if picture.format in ("HEIF", "AVIF"):
        width, height = max((width, height), largest_item(path) or (0, 0), key=lambda size: size[0] * size[1])
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
        except Exception:
            orientation = None  # a broken EXIF block is reported when the picture is decoded
    return (height, width) if orientation in ROTATED_ORIENTATIONS else (width, height)


def _open(path: Path, name: str) -> _Decoded:
    """Open and decode the first frame, upright; bombs are refused from the header before any large allocation.

    Any error a decoder raises on the file's bytes (Pillow's plugins raise many kinds: TypeError for a TIFF page
    without a size, struct.error, KeyError...) means the file is corrupt, and says so naming the input.
    """
    with _open_header(path, name) as picture:
        try:
            if getattr(picture, "is_animated", False):  # looks at the second frame only, never walks them all
                log.warning("%s: animated or multi-page file, using its first frame", name)
            picture.seek(0)
            picture.load()
            exif = picture.getexif()  # before turning the picture upright, which drops what a TIFF's EXIF holds
            upright = ImageOps.exif_transpose(picture)
        except Image.DecompressionBombError:
            raise InputError(f"{name}: larger than {MAX_INPUT_PIXELS:,} pixels") from None
        except Exception:
            raise InputError(f"{name}: the file is truncated or corrupt") from None
        return _Decoded(upright, detached_exif(exif, name), picture.format)


def _sixteen_bit_to_unit(picture: Image.Image) -> np.ndarray:
    return np.clip(np.asarray(picture, dtype=np.float32) / 65535.0, 0.0, 1.0)


def read_picture(
    path: Path, name: str = "image", keep_location: bool = False, output_size: tuple[int, int] | None = None
) -> Picture:
    """Decode a picture, upright, to RGB uint8 in its own colour space (or sRGB for CMYK, gray or CIELAB ones).

    Alpha is flattened onto white, and kept beside the pixels. keep_location keeps EXIF GPS and XMP in the outputs'
    metadata; output_size is the outputs' (width, height) for their EXIF, when it is not the picture's (outpainting).
    """
    decoded = _open(path, name)
    pixels, colour_space = _colour_managed_rgb(decoded, Path(path), name)
    alpha = np.asarray(decoded.image.convert("RGBA").getchannel("A")) if _has_alpha(decoded.image) else None
    log.info("%s: colour space %s", name, colour_space.description)
    height, width = pixels.shape[:2]
    width, height = output_size or (width, height)
    metadata = OutputMetadata(
        icc_profile=colour_space.icc_profile,
        exif=output_exif(decoded.exif, width, height, keep_location, name),
        xmp=output_xmp(decoded.image) if keep_location else None,
    )
    return Picture(pixels, colour_space, metadata, alpha)


def read_image(path: Path, name: str = "image") -> np.ndarray:
    """The pixels of `read_picture`: RGB uint8 (H, W, 3), upright, in the picture's own colour space."""
    return read_picture(path, name).pixels


def _eight_bit_rgb(picture: Image.Image) -> np.ndarray:
    """RGB uint8 (H, W, 3) from any mode, without colour management: 16-bit scaled, alpha flattened onto white."""
    if picture.mode in SIXTEEN_BIT_MODES:
        gray = np.round(_sixteen_bit_to_unit(picture) * 255.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if picture.mode == "F":
        gray = np.clip(np.round(np.asarray(picture, dtype=np.float32)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if _has_alpha(picture):
        rgba = picture.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat.alpha_composite(rgba)
        picture = flat
    return np.asarray(picture.convert("RGB"))


ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _has_alpha(picture: Image.Image) -> bool:
    return (picture.mode == "P" and "transparency" in picture.info) or picture.mode in ALPHA_MODES


def _colour_managed_rgb(decoded: _Decoded, path: Path, name: str) -> tuple[np.ndarray, ColourSpace]:
    """RGB pixels and their space: RGB profiles (ICC or nclx) are kept, others are converted to sRGB."""
    picture = decoded.image
    if picture.mode == "LAB":  # CIELAB needs no profile to mean a colour
        return colour.convert_to_srgb(picture, None), colour.CONVERTED_SRGB
    rgb = _eight_bit_rgb(picture)
    icc_profile = picture.info.get("icc_profile") or None
    if icc_profile is not None:
        return _with_profile(picture, rgb, icc_profile, name) or (rgb, colour.UNTAGGED)
    nclx = _nclx(decoded, path)
    built = colour.nclx_profile(*nclx, name) if nclx else None  # gray with nclx too: R = G = B in that RGB space
    return rgb, (ColourSpace.from_icc(built) if built else colour.UNTAGGED)


def _with_profile(
    picture: Image.Image, rgb: np.ndarray, icc_profile: bytes, name: str
) -> tuple[np.ndarray, ColourSpace] | None:
    """The pixels in the profile's RGB space, or converted to sRGB with it; None, with a warning, if it cannot serve."""
    kind = colour.profile_kind(icc_profile)
    try:
        if kind == "RGB" and picture.mode in RGB_MODES:
            return rgb, ColourSpace.from_icc(icc_profile)
        if kind == "GRAY" and picture.mode in GRAY_MODES:
            return colour.convert_to_srgb(Image.fromarray(rgb[:, :, 0]), icc_profile), colour.CONVERTED_SRGB
        if kind == "CMYK" and picture.mode == "CMYK":
            return colour.convert_to_srgb(picture, icc_profile), colour.CONVERTED_SRGB
    except ImageCms.PyCMSError:
        kind = None  # it parses but lcms2 cannot build a transform from it
    if kind is None:
        log.warning("%s: its colour profile cannot be used; colours read as sRGB", name)
    else:
        log.warning(
            "%s: its %s colour profile does not fit its %s pixels; colours read as sRGB", name, kind, picture.mode
        )
    return None


def _nclx(decoded: _Decoded, path: Path) -> tuple[int, int] | None:
    """(colour primaries, transfer characteristics) from a HEIF or AVIF nclx colour description, if any."""
    if decoded.format == "HEIF":
        description = decoded.image.info.get("nclx_profile")
        return (description["color_primaries"], description["transfer_characteristics"]) if description else None
    if decoded.format == "AVIF":
        return avif_nclx(path)
    return None


def read_map(path: Path, name: str = "map") -> np.ndarray:
    """Decode a change map to float32 (H, W) in [0, 1]: luminance, times alpha where there is one.

    Maps are data, not colour: no colour management.
    """
    picture = _open(path, name).image
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
