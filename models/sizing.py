"""Where the diffusion runs: an SDXL-friendly size of about one megapixel with the input's aspect."""

import math

WORKING_AREA = 1024 * 1024
GRID = 64
"""SDXL's UNet downsamples latents three times, so sides are multiples of 8 * 8 pixels."""
MIN_SIDE, MAX_SIDE = 256, 2048


def working_size(width: int, height: int, area: int = WORKING_AREA) -> tuple[int, int]:
    """Return (width, height) on SDXL's grid with about `area` pixels and the input's aspect.

    Small inputs are upscaled (SDXL is poor far below one megapixel); extreme aspects are clamped to
    MIN_SIDE..MAX_SIDE, which stretches the working picture but not the result.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = math.sqrt(area / (width * height))

    def to_grid(side: float) -> int:
        return min(MAX_SIDE, max(MIN_SIDE, GRID * round(side * scale / GRID)))

    return to_grid(width), to_grid(height)


def aspect_distortion(size: tuple[int, int], working: tuple[int, int]) -> float:
    """Relative change of aspect ratio between an input size and its working size."""
    return abs((working[0] / working[1]) / (size[0] / size[1]) - 1.0)
