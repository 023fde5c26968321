"""Outpainting's canvas: sizes and limits, the map (new area 1, a falling seam, the rest the picture's own) and the
pixels (the picture's exactly, the margin filled)."""

import numpy as np
import pytest
import torch

from models.errors import InputError
from models.limits import MAX_EXTEND, MAX_INPUT_PIXELS
from models.maps import shaping
from models.maps.outpaint import SEAM_MAX, SEAM_MIN, Extension


def test_no_extension_is_none_and_sizes_add_up():
    assert Extension.checked(0, 0, 0, 0, 100, 80) is None
    extension = Extension.checked(10, 20, 5, 0, 100, 80)
    assert extension.canvas_size == (130, 85)


@pytest.mark.parametrize(
    ("sides", "message"),
    [
        ((101, 0, 0, 0), "extend_left: at most 100 pixels for this picture (its width"),
        ((0, 0, 0, 81), "extend_bottom: at most 80 pixels for this picture (its height"),
    ],
)
def test_each_side_is_bounded_by_the_pictures_own_side(sides, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        Extension.checked(*sides, 100, 80)


def test_each_side_is_bounded_by_max_extend_and_the_canvas_by_the_pixel_limit():
    with pytest.raises(InputError, match=f"never more than {MAX_EXTEND}"):
        Extension.checked(MAX_EXTEND + 1, 0, 0, 0, 5000, 5000)
    side = int(MAX_INPUT_PIXELS**0.5)
    with pytest.raises(InputError, match="extended canvas"):
        Extension.checked(MAX_EXTEND, MAX_EXTEND, 0, 0, side, side)


def test_the_seam_scales_with_the_picture_within_bounds():
    assert Extension(1, 0, 0, 0, 1024, 768).seam == 48
    assert Extension(1, 0, 0, 0, 40, 40).seam == SEAM_MIN
    assert Extension(1, 0, 0, 0, 9000, 9000).seam == SEAM_MAX


def test_canvas_map_new_area_is_one_the_seam_falls_and_the_rest_is_the_pictures_map():
    extension = Extension(left=16, right=0, top=0, bottom=8, width=200, height=160)
    seam = extension.seam
    source = torch.zeros(160, 200)
    source[50:60, 150:170] = 0.5
    canvas = extension.canvas_map(source)
    assert canvas.shape == (168, 216)
    assert torch.all(canvas[:, :16] == 1) and torch.all(canvas[160:, :] == 1)
    inside = canvas[:160, 16:]
    row = inside[80]  # a row far from the bottom seam: falls from the left edge
    assert row[0] == 1 and torch.all(row[:seam].diff() < 0) and row[seam - 1] > 0
    assert torch.all(row[seam:] == source[80, seam:])
    assert torch.all(inside[50:60, 150:170] == 0.5)  # the picture's own map, away from the seams
    assert torch.all(inside[: 160 - seam, seam:][source[: 160 - seam, seam:] == 0] == 0)  # kept stays kept


def test_canvas_pixels_keep_the_picture_exactly_in_place():
    extension = Extension(left=4, right=6, top=3, bottom=0, width=20, height=10)
    pixels = np.random.default_rng(0).integers(0, 256, (10, 20, 3), dtype=np.uint8)
    canvas = extension.canvas_pixels(pixels, seed=1)
    assert canvas.shape == (13, 30, 3)
    assert np.array_equal(canvas[3:, 4:24], pixels)


@pytest.mark.parametrize("changes", [{"strength": 0.0}, {"strength": 0.3}, {"blur": 32}])
def test_the_new_area_changes_fully_whatever_strength_and_blur_do(changes):
    """It has no pixels to keep: a new area changed partly would show the fill's noise."""
    extension = Extension(64, 0, 0, 0, 100, 80)
    change_map = shaping.prepare(torch.zeros(80, 100), extension=extension, **changes)
    assert torch.all(change_map[:, :64] == 1)
    assert torch.all(change_map[:, 64 + extension.seam + 40 :] == 0)
