"""Colours for pixels the picture does not have (an outpainted margin, a transparent area), so that the model starts
from the picture's own colours instead of flat grey: the known colours spread outward, then stirred with noise.

Flat grey or black under full change still shows through a few-step edit as a washed-out patch; colours spread from
the edges give the low frequencies a plausible start, and the noise keeps them from reading as smooth smears
(diffusers#7038's recipe for outpainting in few steps).
"""

import numpy as np
import torch
import torch.nn.functional as F

FILL_NOISE = 0.08
"""Standard deviation of the noise stirred into filled pixels, on the 0-1 scale (about 20 of 255)."""

FILL_SIDE = 1024
"""The spreading runs on the picture shrunk to at most this longer side: the model sees about a megapixel, and the
spread colours are smooth anyway. Only the noise is drawn at full size (a 12-megapixel fill then costs about a second
and ~27 bytes a pixel on a CPU, not 5 s and ~75; docs/BENCHMARKS.md)."""


def spread(colour: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Every pixel's colour (3, H, W) from the known ones: weight (1, H, W) is how known each pixel is (0 to 1). Known
    pixels keep their colour, unknown ones take the known ones nearest, at the finest scale that has any: a push-pull
    pyramid, as in Gortler et al.'s Lumigraph.

    Going down, each level averages the known colours of 2x2 blocks and counts a block as known in proportion to its
    known pixels, fully from one known pixel in four up; coming back up, a pixel keeps its own level's colour in
    proportion to how known it is and takes the coarser level's for the rest.
    """
    levels = [(colour[None], weight[None])]
    while max(weight.shape[-2:]) > 1:  # down to one pixel, which holds the average of every known one
        colour, weight = levels[-1]
        block = tuple(2 if side > 1 else 1 for side in weight.shape[-2:])
        pooled_weight = F.avg_pool2d(weight, block, ceil_mode=True)
        colour = F.avg_pool2d(colour * weight, block, ceil_mode=True) / pooled_weight.clamp_min(1e-12)
        weight = (4.0 * pooled_weight).clamp(max=1.0)
        levels.append((colour, weight))
    filled, _ = levels.pop()
    for colour, weight in reversed(levels):
        coarser = F.interpolate(filled, size=colour.shape[-2:], mode="bilinear", align_corners=False)
        filled = weight * colour + (1.0 - weight) * coarser
    return filled[0]


def spread_colours(pixels: np.ndarray, known: np.ndarray) -> torch.Tensor:
    """The picture's colours spread over its unknown pixels (known False), at at most FILL_SIDE: RGB float32
    (h, w, 3) in [0, 1]. Shrinking averages the known pixels of each area and keeps how much of it is known."""
    height, width = known.shape
    scale = min(1.0, FILL_SIDE / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    weight = torch.from_numpy(known.astype(np.float32))[None, None]
    small_weight = F.interpolate(weight, size=size, mode="area")
    channels = []
    for channel in range(3):  # one channel at a time: a float copy of the whole picture is 4 bytes a pixel, not 12
        values = torch.from_numpy(np.ascontiguousarray(pixels[:, :, channel])).float().div_(255.0)[None, None]
        channels.append(F.interpolate(values.mul_(weight), size=size, mode="area")[0, 0])
    colour = torch.stack(channels) / small_weight[0].clamp_min(1e-12)
    known_share = (4.0 * small_weight[0]).clamp(max=1.0)  # the pyramid's rule: fully known from a quarter up
    return spread(colour, known_share).permute(1, 2, 0)


def fill_unknown(pixels: np.ndarray, known: np.ndarray, seed: int) -> np.ndarray:
    """The picture (RGB uint8 (H, W, 3)) with its unknown pixels (known False) given spread colours (brought back to
    full size) and noise; known pixels are returned unchanged, by selection."""
    height, width = known.shape
    small = spread_colours(pixels, known).permute(2, 0, 1)[None]
    generator = torch.Generator().manual_seed(seed)
    unknown = torch.from_numpy(~known)
    filled = pixels.copy()
    for channel in range(3):
        colour = F.interpolate(small[:, channel : channel + 1], size=(height, width), mode="bilinear")[0, 0]
        noise = torch.randn(int(unknown.sum()), generator=generator) * FILL_NOISE
        stirred = (colour[unknown] + noise).clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
        filled[:, :, channel][unknown.numpy()] = stirred.numpy()
    return filled
