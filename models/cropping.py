"""Full detail where the edit is: when the changed area is a small part of a large picture, edit a crop around it.

The whole-picture path generates at about one megapixel, so in a 4000x3000 photo a small edit gets a quarter of the
photo's resolution and looks soft beside the sharp kept pixels. The rule:

- The changed area is where the map (after grow, blur and strength) is above 0. Several separate regions share one
  crop: the bounding box of all of them.
- Context: the box grows by CROP_MARGIN of its longer side on every side (at least MIN_CROP_MARGIN pixels), so the
  model sees what surrounds the edit, and to at least MIN_CROP_SIDE pixels a side; it stays inside the picture.
- Working size: the crop's own aspect at about one megapixel, upscaled at most MAX_CROP_UPSCALE times per side (a
  smaller crop is generated at that scale, which the model handles less well below one megapixel).
- The crop is used when it pays: when it gives at least CROP_GAIN times the whole picture's working pixels per
  changed pixel, counting at most one working pixel per pixel of the input (detail beyond the input's own resolution
  is lost when the result is brought back to its size). Otherwise (and with crop_to_map off) the whole picture is
  edited: a picture of about one megapixel or less never gets a crop.

Kept pixels stay byte-exact: the crop's edit is composited inside the crop as usual, everything outside it is the
input's own pixels, and the margin keeps the feathered band away from the crop's edges.
"""

import math
from dataclasses import dataclass

import torch

from .sizing import WORKING_AREA

CROP_GAIN = 1.5
CROP_MARGIN = 0.5
MIN_CROP_MARGIN = 64
MIN_CROP_SIDE = 512
MAX_CROP_UPSCALE = 2.0


@dataclass(frozen=True)
class Crop:
    """A box of the picture (right and bottom exclusive), the working area to edit it at, and what it gains."""

    left: int
    top: int
    right: int
    bottom: int
    working_area: int
    gain: float
    """Working pixels per changed pixel (at most 1), over the whole-picture path's."""

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top


def _span(start: int, stop: int, margin: int, minimum: int, limit: int) -> tuple[int, int]:
    """An interval grown by margin on both sides, then to at least minimum long, kept within [0, limit)."""
    start, stop = start - margin, stop + margin
    if stop - start < minimum:
        extra = minimum - (stop - start)
        start, stop = start - extra // 2, stop + extra - extra // 2
    if start < 0:
        start, stop = 0, stop - start
    if stop > limit:
        start, stop = max(0, start - (stop - limit)), limit
    return start, min(stop, limit)


def choose_crop(change_map: torch.Tensor, working_area: int = WORKING_AREA) -> Crop | None:
    """The crop to edit instead of the whole picture, or None when it would not pay (or nothing changes)."""
    height, width = change_map.shape
    changed = change_map > 0
    rows, columns = changed.any(dim=1).nonzero(), changed.any(dim=0).nonzero()
    if len(rows) == 0:
        return None
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1
    margin = max(MIN_CROP_MARGIN, math.ceil(CROP_MARGIN * max(bottom - top, right - left)))
    left, right = _span(left, right, margin, MIN_CROP_SIDE, width)
    top, bottom = _span(top, bottom, margin, MIN_CROP_SIDE, height)
    crop_area = (right - left) * (bottom - top)
    area = min(working_area, int(crop_area * MAX_CROP_UPSCALE**2))
    gain = min(1.0, area / crop_area) / min(1.0, working_area / (width * height))
    if gain < CROP_GAIN:
        return None
    return Crop(left, top, right, bottom, area, gain)
