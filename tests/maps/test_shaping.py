"""Change maps: fitting, antialiasing, strength and the feathered composite mask."""

import pytest
import torch
import torch.nn.functional as F

from models.errors import InputError
from models.maps import shaping


def test_map_of_another_size_but_same_aspect_is_resized_to_the_image():
    fitted = shaping.fit_to_image(torch.rand(300, 400), width=800, height=600)
    assert fitted.shape == (600, 800)


def test_map_of_another_aspect_is_a_clear_error():
    with pytest.raises(InputError, match=r"^map: .*aspect ratio"):
        shaping.fit_to_image(torch.rand(300, 300), width=800, height=600)


def test_resize_is_antialiased_not_aliased():
    """One-pixel stripes shrunk by 4 average to grey instead of aliasing to black or white."""
    stripes = torch.zeros(64, 64)
    stripes[:, ::2] = 1.0
    small = shaping.resize_map(stripes, 16, 16)
    interior = small[:, 1:-1]
    assert torch.allclose(interior, torch.full_like(interior, 0.5), atol=0.01)


def test_resize_keeps_zeros_exactly_zero_away_from_changes():
    change_map = torch.zeros(200, 200)
    change_map[:50, :50] = 1.0
    small = shaping.resize_map(change_map, 100, 100)
    assert (small[40:, 40:] == 0).all()
    assert (small >= 0).all() and (small <= 1).all()


def test_strength_scales():
    change_map = torch.tensor([[0.0, 0.5, 1.0]])
    assert shaping.prepare(change_map, strength=0.5).tolist() == [[0.0, 0.25, 0.5]]


def square_mask(size: int = 400, low: int = 180, high: int = 220) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[low:high, low:high] = 1.0
    return mask


def test_grow_widens_the_changed_area_by_exactly_its_pixels():
    grown = shaping.prepare(square_mask(), grow=30)
    assert (grown[150:250, 150:250] == 1).all()
    assert (grown[149, :] == 0).all() and (grown[:, 250] == 0).all()


@pytest.mark.parametrize("radius", [8, 40, 200])
def test_blur_softens_edges_and_leaves_zeros_beyond_its_reach(radius):
    blurred = shaping.prepare(square_mask(1200, 580, 620), blur=radius)
    reach = radius + 2 * (radius // shaping.BLUR_TAPS) + 1
    assert blurred[600, 600] >= blurred[600, 610] > blurred[600, 620 + radius // 2] > 0
    outside = torch.ones_like(blurred, dtype=torch.bool)
    outside[580 - reach : 620 + reach, 580 - reach : 620 + reach] = False
    assert (blurred[outside] == 0).all(), "pixels beyond grow + blur must stay exactly kept"
    assert (blurred >= 0).all() and (blurred <= 1).all()


def test_grow_and_blur_come_before_strength():
    prepared = shaping.prepare(square_mask(), grow=10, blur=5, strength=0.5)
    assert torch.equal(prepared, shaping.prepare(square_mask(), grow=10, blur=5) * 0.5)
    assert prepared.max() == 0.5


def test_composite_alpha_is_one_inside_zero_far_outside_and_feathered_between():
    change_map = torch.zeros(64, 64)
    change_map[:, :32] = 1.0
    alpha = shaping.composite_alpha(change_map, feather_px=4)
    row = alpha[32]
    assert (row[:32] == 1).all()
    assert (row[32 + 8 :] == 0).all(), "exactly zero beyond the feather band"
    band = row[32 : 32 + 8]
    assert ((band > 0) & (band < 1)).all(), "a soft ramp, not a hard cut"
    assert (band.diff() < 0).all()


def test_composite_alpha_fades_in_for_faint_maps():
    alpha = shaping.composite_alpha(torch.full((16, 16), shaping.FULL_BLEND_AT / 2), feather_px=2)
    assert torch.allclose(alpha, torch.full_like(alpha, 0.5))


def test_all_black_map_keeps_everything():
    assert (shaping.composite_alpha(torch.zeros(32, 48)) == 0).all()


def test_composite_alpha_is_a_square_dilation_then_a_square_box_blur():
    """The row-by-row passes compute the 2-D square windows they stand for, at the borders too."""
    torch.manual_seed(0)
    change_map = torch.rand(37, 53) ** 4
    radius, size = 3, 7
    coverage = (change_map / shaping.FULL_BLEND_AT).clamp(0.0, 1.0)[None, None]
    dilated = F.max_pool2d(coverage, size, stride=1, padding=radius)
    blurred = F.avg_pool2d(dilated, size, stride=1, padding=radius, count_include_pad=False)
    expected = blurred[0, 0].clamp(0.0, 1.0)
    torch.testing.assert_close(shaping.composite_alpha(change_map, feather_px=radius), expected)


def test_near_black_up_to_2_of_255_is_black():
    decoded = torch.tensor([[0, 1, 2, 3, 128, 255]], dtype=torch.float32) / 255
    assert (shaping.prepare(decoded) * 255).round().tolist() == [[0, 0, 0, 3, 128, 255]]


def test_the_floor_comes_before_grow_and_blur():
    """Near-black everywhere does not grow into a changed picture; the square does."""
    change_map = torch.full((40, 40), 2 / 255)
    change_map[18:22, 18:22] = 1.0
    prepared = shaping.prepare(change_map, grow=4, blur=4)
    assert prepared[0, 0] == 0 and prepared[20, 20] == pytest.approx(1.0)
