"""Change maps: fitting them to the image, strength and inversion, and the feathered composite mask.

A map is a float tensor (H, W) in [0, 1]: 0 keeps a pixel exactly, 1 regenerates it.
"""

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..limits import MAP_ASPECT_TOLERANCE
from .outpaint import Extension

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


NEAR_BLACK = 2.5 / 255
"""Map values below this (0, 1 and 2 of 255) count as black, kept exactly: a JPEG's ringing and a resize's or a
dither's 1-3 of 255 would otherwise change every pixel a little and stop the crop and the skipped steps."""


def black_below_floor(change_map: torch.Tensor) -> torch.Tensor:
    """Near-black (below NEAR_BLACK) made exactly 0; every other value left as it is."""
    return torch.where(change_map < NEAR_BLACK, 0.0, change_map)


BLUR_TAPS = 16
"""Gaussian taps per side that map_blur computes at most: larger radii run on a map decimated to keep this many."""


def prepare(
    change_map: torch.Tensor,
    *,
    grow: int = 0,
    blur: int = 0,
    strength: float = 1.0,
    extension: Extension | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """A map at the image's size (inverted already, where asked) made ready for the edit, in this order: make
    near-black black, grow the canvas by `extension` (the new area 1, a falling ramp along the seam), grow the
    changed area by `grow` pixels, soften its edges with a Gaussian of radius `blur`, hold back what `keep` names
    (0 to 1 at the image's size: map_negative_prompt), scale by strength; the extension's new area is 1 whatever
    came before, since it has no pixels to keep.

    The canvas comes after the floor, so its seam is not floored away; grow and blur after both, so they always act
    on the area that changes; `keep` after them, so what it names is kept however far they reach; strength last, so
    that it scales the softened map like any other. A pixel farther than grow + blur (+ blur / 8) from every
    changed pixel stays exactly 0, so it is kept exactly.
    """
    change_map = black_below_floor(change_map)
    if extension is not None:
        change_map = extension.canvas_map(change_map)
    if grow > 0:
        change_map = _separable_pool(change_map.contiguous(), grow, F.max_pool1d)
    if blur > 0:
        change_map = gaussian_blur(change_map, blur)
    if keep is not None:
        change_map = change_map * (1.0 - (keep if extension is None else extension.on_canvas(keep)))
    change_map = change_map * strength
    if extension is not None:
        change_map = torch.maximum(change_map, extension.new_area())
    return change_map


def _gaussian_rows(change_map: torch.Tensor, radius: int) -> torch.Tensor:
    """A Gaussian (sigma = radius / 3, cut at the radius) along each row; zero padding, so zeros far away stay 0."""
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=change_map.device)
    kernel = torch.exp(-0.5 * (taps * 3.0 / radius) ** 2)
    height, width = change_map.shape
    rows = F.conv1d(change_map.reshape(height, 1, width), (kernel / kernel.sum()).view(1, 1, -1), padding=radius)
    return rows.reshape(height, width)


def gaussian_blur(change_map: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of radius `radius` pixels, exactly 0 beyond it (beyond 2 * radius / BLUR_TAPS more
    where a large radius runs decimated: in full, a large radius on a large picture takes seconds on a CPU)."""
    height, width = change_map.shape
    step = max(1, radius // BLUR_TAPS)
    small = change_map if step == 1 else F.avg_pool2d(change_map[None, None], step, ceil_mode=True)[0, 0]
    small_radius = -(-radius // step)
    small = _gaussian_rows(_gaussian_rows(small, small_radius).t().contiguous(), small_radius).t().contiguous()
    if step > 1:
        small = F.interpolate(small[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    return small.clamp(0.0, 1.0)


def _pool_rows(mask: torch.Tensor, radius: int, pool, **kwargs) -> torch.Tensor:
    """A 1-D pooling window along each row of an (H, W) mask."""
    height, width = mask.shape
    pooled = pool(mask.reshape(height, 1, width), 2 * radius + 1, stride=1, padding=radius, **kwargs)
    return pooled.reshape(height, width)


def _separable_pool(mask: torch.Tensor, radius: int, pool, **kwargs) -> torch.Tensor:
    """A square pooling window as 1-D passes along rows, then along columns through a transpose.

    Two passes make it O(radius) per pixel, not O(radius^2); running both along contiguous rows is several times
    faster on a CPU than 2-D pooling with a tall window (docs/BENCHMARKS.md, "Figures behind the code's choices").
    """
    rows = _pool_rows(mask, radius, pool, **kwargs)
    return _pool_rows(rows.t().contiguous(), radius, pool, **kwargs).t().contiguous()


def composite_alpha(change_map: torch.Tensor, feather_px: int = FEATHER_PX) -> torch.Tensor:
    """Per-pixel weight of the generated picture in the final composite, shape (H, W).

    1 on changed pixels (map >= FULL_BLEND_AT), ramping to exactly 0 within 2 * feather_px pixels
    outside them, so kept pixels further away come back byte for byte and the border has no seam.
    """
    coverage = (change_map / FULL_BLEND_AT).clamp(0.0, 1.0)
    if feather_px > 0:
        coverage = _separable_pool(coverage, feather_px, F.max_pool1d)
        coverage = _separable_pool(coverage, feather_px, F.avg_pool1d, count_include_pad=False)
    return coverage.clamp(0.0, 1.0)
