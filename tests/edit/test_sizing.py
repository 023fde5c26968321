"""The working size: about one megapixel, on SDXL's grid, with the input's aspect."""

import pytest

from models.sizing import GRID, MAX_SIDE, MIN_SIDE, aspect_distortion, working_size


@pytest.mark.parametrize(
    ("size", "expected"),
    [((1024, 1024), (1024, 1024)), ((512, 512), (1024, 1024)), ((1, 1), (1024, 1024)), ((4000, 3000), (1152, 896))],
)
def test_working_size(size, expected):
    assert working_size(*size) == expected


@pytest.mark.parametrize("size", [(4032, 3024), (1920, 1080), (1080, 1920), (333, 777), (6000, 2000)])
def test_working_size_is_about_a_megapixel_on_the_grid_with_the_same_aspect(size):
    width, height = working_size(*size)
    assert width % GRID == 0 and height % GRID == 0
    assert 0.85 < width * height / 1024**2 < 1.15
    assert aspect_distortion(size, (width, height)) < 0.06


def test_extreme_aspect_is_clamped_to_sides_sdxl_can_run():
    assert working_size(10000, 10) == (MAX_SIDE, MIN_SIDE)


def test_empty_size_is_refused():
    with pytest.raises(ValueError):
        working_size(0, 10)
