"""Training photos made ready: decoded upright in sRGB, each brought to an aspect bucket, and captioned.

Aspect buckets rather than square crops: a portrait photo cropped square loses the head or the feet, and SDXL was
trained on buckets of about one megapixel at many aspects. Each picture goes to the bucket nearest its aspect ratio,
is scaled to cover it and centre-cropped (the crop is what SDXL's micro-conditioning is told, with the original size).
"""

import logging
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..pictures.read import read_picture
from .archive import NAME, Photo

log = logging.getLogger(__name__)

BUCKET_MULTIPLE = 64
MAX_BUCKET_ASPECT = 2.5
"""Widest (and tallest) bucket: a 2.5:1 panorama; wider pictures are cropped to it."""
UPSCALE_WARNING = 2.0


@dataclass(frozen=True)
class Example:
    """One training picture at its bucket's size, and what SDXL is told about it."""

    name: str
    pixels: np.ndarray
    """RGB uint8 (bucket height, bucket width, 3) in sRGB."""
    prompt: str
    original_size: tuple[int, int]
    """(height, width) of the picture as uploaded, upright."""
    crop_top_left: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[0], self.pixels.shape[1]


def buckets(resolution: int) -> list[tuple[int, int]]:
    """(height, width) pairs, multiples of 64 of at most resolution² pixels, from 1:2.5 to 2.5:1."""
    area = resolution * resolution
    found = set()
    for width in range(BUCKET_MULTIPLE, int(resolution * MAX_BUCKET_ASPECT) + 1, BUCKET_MULTIPLE):
        height = area // width // BUCKET_MULTIPLE * BUCKET_MULTIPLE
        if height >= BUCKET_MULTIPLE and 1 / MAX_BUCKET_ASPECT <= width / height <= MAX_BUCKET_ASPECT:
            found.add((height, width))
    return sorted(found)


def nearest_bucket(height: int, width: int, resolution: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the picture's (in log ratio: 2:1 is as far from 1:1 as 1:2)."""
    aspect = math.log(width / height)
    return min(buckets(resolution), key=lambda bucket: (abs(math.log(bucket[1] / bucket[0]) - aspect), -bucket[0]))


def fit_to_bucket(pixels: np.ndarray, bucket: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Scale to cover the bucket (Lanczos), centre-crop to it; the pixels and the crop's top-left corner."""
    height, width = pixels.shape[:2]
    scale = max(bucket[0] / height, bucket[1] / width)
    scaled = (max(bucket[0], round(height * scale)), max(bucket[1], round(width * scale)))
    resized = np.array(Image.fromarray(pixels).resize((scaled[1], scaled[0]), Image.Resampling.LANCZOS))
    top, left = (scaled[0] - bucket[0]) // 2, (scaled[1] - bucket[1]) // 2
    return resized[top : top + bucket[0], left : left + bucket[1]], (top, left)


def prompt_of(caption: str | None, caption_prefix: str, token: str) -> str:
    """What a picture is trained with: its caption after the prefix (unless the caption says the token already), or
    the prefix alone, without its trailing comma."""
    if not caption:
        return caption_prefix.strip().rstrip(",").strip()
    if token in caption or not caption_prefix:
        return caption
    return f"{caption_prefix} {caption}"


def prepare(photos: list[Photo], resolution: int, caption_prefix: str, token: str) -> list[Example]:
    """Decode each photo (the `image` input's decoder and limits), bring it to sRGB and to its bucket, one at a time
    so that only bucket-sized pixels are kept."""
    examples = []
    for photo in photos:
        picture = read_picture(photo.path, f"{NAME}: {photo.name}")
        pixels = picture.pixels if picture.colour_space.is_srgb else picture.colour_space.to_srgb(picture.pixels)
        height, width = pixels.shape[:2]
        bucket = nearest_bucket(height, width, resolution)
        scale = max(bucket[0] / height, bucket[1] / width)
        if scale > UPSCALE_WARNING:
            log.warning("%s: %s is %dx%d, upscaled %.1fx to %dx%d: it will train blurry", NAME, photo.name, width,
                        height, scale, bucket[1], bucket[0])  # fmt: skip
        fitted, corner = fit_to_bucket(pixels, bucket)
        examples.append(
            Example(photo.name, fitted, prompt_of(photo.caption, caption_prefix, token), (height, width), corner)
        )
    counts: dict[tuple[int, int], int] = {}
    for example in examples:
        counts[example.size] = counts.get(example.size, 0) + 1
    log.info("buckets (width x height: pictures): %s",
             ", ".join(f"{w}x{h}: {n}" for (h, w), n in sorted(counts.items())))  # fmt: skip
    return examples
