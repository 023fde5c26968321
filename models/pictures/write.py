"""Encoding results, with the input's metadata: the only code that writes picture files."""

import io
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from ..errors import InputError
from .metadata import OutputMetadata

log = logging.getLogger(__name__)

OUTPUT_FORMATS = ("webp", "png", "jpg")

JPEG_MARKER_BYTES = 65533
"""Most a JPEG APP marker holds: EXIF or XMP beyond it cannot go into a JPEG."""


def encode_image(pixels: np.ndarray, output_format: str, quality: int, metadata: OutputMetadata | None = None) -> bytes:
    """Encode RGB uint8 (H, W, 3) with the input's metadata; settings keep encoding far cheaper than the GPU work."""
    metadata = metadata or OutputMetadata()
    options: dict = {}
    if metadata.icc_profile:
        options["icc_profile"] = metadata.icc_profile
    if metadata.exif:
        options["exif"] = metadata.exif
    picture = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if output_format == "png":
        if metadata.xmp:
            text = PngImagePlugin.PngInfo()
            text.add_itxt("XML:com.adobe.xmp", metadata.xmp)
            options["pnginfo"] = text
        picture.save(buffer, format="PNG", compress_level=1, **options)
    elif output_format == "jpg":
        if metadata.xmp:
            options["xmp"] = metadata.xmp
        for key, overhead in (("exif", 0), ("xmp", len(b"http://ns.adobe.com/xap/1.0/\0"))):
            if key in options and len(options[key]) + overhead > JPEG_MARKER_BYTES:
                log.warning(
                    "output: the input's %s (%d bytes) does not fit in a JPEG; left out", key, len(options[key])
                )
                del options[key]
        picture.save(buffer, format="JPEG", quality=quality, **options)
    elif output_format == "webp":
        if metadata.xmp:
            options["xmp"] = metadata.xmp
        picture.save(buffer, format="WEBP", quality=quality, method=2, **options)
    else:
        raise InputError(f"output_format: {output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    return buffer.getvalue()


def write_pictures(
    images: list[np.ndarray], paths: list[Path], output_format: str, quality: int, metadata: OutputMetadata | None
) -> None:
    """Write each result to its path, each with the input's metadata."""
    for path, pixels in zip(paths, images, strict=True):
        path.write_bytes(encode_image(pixels, output_format, quality, metadata))


def encode_map(change_map: np.ndarray) -> bytes:
    """A change map ((H, W) float in [0, 1]) as a 16-bit grayscale PNG, rounded up: a pixel the map changes at all is
    at least 1 of 65535, never black."""
    levels = np.ceil(np.clip(change_map, 0.0, 1.0) * 65535.0).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def map_path_beside(first_output: Path) -> Path:
    """Where return_map's map goes: beside the first output, as <its name>-map.png."""
    return first_output.with_name(f"{first_output.stem}-map.png")


def numbered_paths(folder: Path) -> Callable[[int, str], list[Path]]:
    """Outputs named folder/out-N.<format>, as the predictor writes them."""
    return lambda count, output_format: [folder / f"out-{index}.{output_format}" for index in range(count)]
