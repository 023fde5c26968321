"""Change maps: fitting them to the image, strength and inversion, and the feathered composite mask.

A map is a float tensor (H, W) in [0, 1]: 0 keeps a pixel exactly, 1 regenerates it.
"""

import torch
import torch.nn.functional as F

from .errors import InputError
from .limits import MAP_ASPECT_TOLERANCE

FEATHER_PX = 8
"""Half-width, in working pixels, of the band over which generated pixels fade into the original."""

FULL_BLEND_AT = 0.1
"""Map value at and above which a pixel shows the generated result fully; below, it fades linearly to 0."""


def resize_map(change_map: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize with an antialiased, non-negative filter: zeros stay exactly zero away from changed pixels."""
    if change_map.shape == (height, width):
        return change_map
    resized = F.interpolate(change_map[None, None], size=(height, width), mode="bilinear", antialias=True)
    return resized[0, 0].clamp(0.0, 1.0)


def fit_to_image(change_map: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize a map of the image's aspect to the image's size; refuse another aspect."""
    map_height, map_width = change_map.shape
    mismatch = abs((map_width / map_height) / (width / height) - 1.0)
    if mismatch > MAP_ASPECT_TOLERANCE:
        raise InputError(
            f"map: its aspect ratio ({map_width}x{map_height}) differs from the image's ({width}x{height});"
            " give a map of the same aspect ratio (any size)"
        )
    return resize_map(change_map, height, width)


def apply_strength(change_map: torch.Tensor, strength: float, invert: bool) -> torch.Tensor:
    """Invert for maps in the paper's convention (white = keep), then scale the whole map by strength."""
    if invert:
        change_map = 1.0 - change_map
    return change_map * strength


def _separable_pool(mask: torch.Tensor, radius: int, pool) -> torch.Tensor:
    """Apply a square pooling window as two 1-D passes: O(radius) per pixel, not O(radius^2)."""
    size = 2 * radius + 1
    rows = pool(mask, kernel_size=(size, 1), stride=1, padding=(radius, 0))
    return pool(rows, kernel_size=(1, size), stride=1, padding=(0, radius))


def _average_pool(mask: torch.Tensor, **kwargs) -> torch.Tensor:
    return F.avg_pool2d(mask, count_include_pad=False, **kwargs)


def composite_alpha(change_map: torch.Tensor, feather_px: int = FEATHER_PX) -> torch.Tensor:
    """Per-pixel weight of the generated picture in the final composite, shape (H, W).

    1 on changed pixels (map >= FULL_BLEND_AT), ramping to exactly 0 within 2 * feather_px pixels
    outside them, so kept pixels further away come back byte for byte and the border has no seam.
    """
    coverage = (change_map / FULL_BLEND_AT).clamp(0.0, 1.0)[None, None]
    if feather_px > 0:
        coverage = _separable_pool(coverage, feather_px, F.max_pool2d)
        coverage = _separable_pool(coverage, feather_px, _average_pool)
    return coverage[0, 0].clamp(0.0, 1.0)
