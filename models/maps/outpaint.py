"""Outpainting: a larger canvas around the picture, its new area filled and changed fully, and a band of the picture
along each new edge changed partly so the seam is regenerated rather than drawn.
"""

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..limits import MAX_EXTEND, MAX_INPUT_PIXELS
from .fill import fill_unknown

SEAM_FRACTION = 1 / 16
"""Width of the seam band, as a share of the picture's shorter side (64 pixels for a 1024-pixel side)..."""
SEAM_MIN, SEAM_MAX = 8, 256
"""...and its bounds in pixels."""


@dataclass(frozen=True)
class Extension:
    """How many pixels the canvas grows on each side, for a picture of width x height."""

    left: int
    right: int
    top: int
    bottom: int
    width: int
    height: int

    @classmethod
    def checked(cls, left: int, right: int, top: int, bottom: int, width: int, height: int) -> "Extension | None":
        """The extension, None when every side is 0; one line naming the side that asks too much."""
        for name, pixels, side, size in (("extend_left", left, "width", width), ("extend_right", right, "width", width),
                                         ("extend_top", top, "height", height),
                                         ("extend_bottom", bottom, "height", height)):  # fmt: skip
            if pixels > min(size, MAX_EXTEND):
                raise InputError(
                    f"{name}: at most {min(size, MAX_EXTEND)} pixels for this picture (its {side}, and never more than"
                    f" {MAX_EXTEND}), got {pixels}"
                )
        extension = cls(left, right, top, bottom, width, height)
        canvas_width, canvas_height = extension.canvas_size
        if canvas_width * canvas_height > MAX_INPUT_PIXELS:
            raise InputError(
                f"extend_*: the extended canvas {canvas_width}x{canvas_height} is larger than {MAX_INPUT_PIXELS:,}"
                " pixels; extend less"
            )
        return extension if left or right or top or bottom else None

    @property
    def canvas_size(self) -> tuple[int, int]:
        """(width, height) of the extended canvas."""
        return self.left + self.width + self.right, self.top + self.height + self.bottom

    @property
    def seam(self) -> int:
        """Width in pixels of the band of the picture, along each new edge, that changes partly."""
        return int(np.clip(round(min(self.width, self.height) * SEAM_FRACTION), SEAM_MIN, SEAM_MAX))

    @property
    def inside(self) -> tuple[slice, slice]:
        """Where the picture lies on the canvas: (rows, columns)."""
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    def on_canvas(self, values: torch.Tensor) -> torch.Tensor:
        """(H, W) values at the picture's size placed on the canvas, 0 on the new area."""
        canvas_width, canvas_height = self.canvas_size
        canvas = torch.zeros(canvas_height, canvas_width, dtype=values.dtype)
        canvas[self.inside] = values
        return canvas

    def new_area(self) -> torch.Tensor:
        """1 on the canvas's new area, 0 on the picture."""
        return 1.0 - self.on_canvas(torch.ones(self.height, self.width))

    def canvas_map(self, change_map: torch.Tensor) -> torch.Tensor:
        """The picture's map (H, W) placed on the canvas: 1 on the new area; along each extended side, a ramp from 1
        at the new edge down to 0 at the seam's width inside the picture (the larger of it and the picture's map);
        the picture's map unchanged elsewhere."""
        seam = self.seam
        ramp = 1.0 - torch.arange(seam, dtype=change_map.dtype) / seam  # 1 at the edge, falling to 1 / seam
        columns = torch.zeros(self.width, dtype=change_map.dtype)
        rows = torch.zeros(self.height, dtype=change_map.dtype)
        for profile, before, after in ((columns, self.left, self.right), (rows, self.top, self.bottom)):
            band = min(seam, profile.numel())
            if before:
                profile[:band] = torch.maximum(profile[:band], ramp[:band])
            if after:
                profile[-band:] = torch.maximum(profile[-band:], ramp[:band].flip(0))
        seam_map = torch.maximum(columns[None, :], rows[:, None])
        return torch.maximum(self.on_canvas(torch.maximum(change_map, seam_map)), self.new_area())

    def canvas_pixels(self, pixels: np.ndarray, seed: int) -> np.ndarray:
        """The picture (H, W, 3) on the canvas, the new area filled from its edges (fill.fill_unknown)."""
        canvas_width, canvas_height = self.canvas_size
        canvas = np.zeros((canvas_height, canvas_width, 3), dtype=np.uint8)
        known = np.zeros((canvas_height, canvas_width), dtype=bool)
        canvas[self.inside] = pixels
        known[self.inside] = True
        return fill_unknown(canvas, known, seed)
