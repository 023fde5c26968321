"""The crop rule: when editing a crop around the changed area pays, and which crop."""

import pytest
import torch

from models import cropping
from models.sizing import WORKING_AREA


def map_with(width: int, height: int, *boxes: tuple[int, int, int, int]) -> torch.Tensor:
    change_map = torch.zeros(height, width)
    for left, top, right, bottom in boxes:
        change_map[top:bottom, left:right] = 1.0
    return change_map


def test_a_small_edit_in_a_large_photo_gets_a_crop_with_context():
    """The issue's case: a 500x500 edit in a 4000x3000 photo."""
    crop = cropping.choose_crop(map_with(4000, 3000, (1750, 1250, 2250, 1750)))
    assert (crop.left, crop.top, crop.right, crop.bottom) == (1500, 1000, 2500, 2000)  # 250 px of context each way
    assert crop.working_area == WORKING_AREA
    whole, cropped = WORKING_AREA / (4000 * 3000), crop.working_area / (crop.width * crop.height)
    assert cropped > 1 and crop.gain == pytest.approx(1 / whole) and crop.gain > 11  # 0.087 working px per px -> 1


def test_no_crop_when_it_would_not_pay():
    assert cropping.choose_crop(map_with(1024, 1024, (100, 100, 200, 200))) is None  # the picture is the working size
    assert cropping.choose_crop(map_with(1400, 1000, (700, 400, 800, 500))) is None  # 1.4 MP: would gain 1.34x
    assert cropping.choose_crop(map_with(4000, 3000, (0, 0, 3000, 2500))) is None  # most of the picture changes
    assert cropping.choose_crop(torch.zeros(3000, 4000)) is None  # nothing changes


def test_separate_regions_share_one_crop_and_a_crop_stays_inside_the_picture():
    crop = cropping.choose_crop(map_with(6000, 4000, (0, 0, 100, 100), (400, 300, 500, 400)))
    assert (crop.left, crop.top) == (0, 0) and crop.right >= 500 + 64 and crop.bottom >= 400 + 64


def test_the_smallest_crop_and_the_largest_upscale():
    crop = cropping.choose_crop(map_with(6000, 4000, (3000, 2000, 3010, 2010)))
    assert (crop.width, crop.height) == (cropping.MIN_CROP_SIDE, cropping.MIN_CROP_SIDE)
    assert crop.working_area == int(crop.width * crop.height * cropping.MAX_CROP_UPSCALE**2)
