"""Filling pixels the picture lacks: known pixels untouched, unknown ones from the nearest known colours."""

import numpy as np

from models.maps.fill import FILL_NOISE, FILL_SIDE, fill_unknown, spread_colours


def test_known_pixels_stay_exactly_and_a_hole_takes_its_surroundings_colour():
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[:, :24] = (200, 30, 10)
    pixels[:, 24:] = (10, 40, 220)
    known = np.ones((32, 48), bool)
    known[8:24, 2:10] = False  # a hole in the red half
    spread = spread_colours(pixels, known).numpy()
    assert np.array_equal(np.round(spread[known] * 255), pixels[known].astype(np.float64))
    assert np.allclose(spread[12:20, 4:8], np.array([200, 30, 10]) / 255, atol=0.02)


def test_a_margin_spreads_the_edge_colours_outward():
    """A picture placed on a larger canvas: the margin beside each edge takes that edge's colours (averaged over more
    of the picture farther out), not grey."""
    canvas = np.zeros((40, 120, 3), np.uint8)
    known = np.zeros((40, 120), bool)
    canvas[:, 40:80, 0] = np.linspace(0, 255, 40).astype(np.uint8)[None, :]  # dark on the left, bright on the right
    known[:, 40:80] = True
    spread = spread_colours(canvas, known).numpy()[:, :, 0]
    assert spread[:, 36:40].mean() < 0.15 and spread[:, 80:84].mean() > 0.85
    assert spread[:, :40].max() < 0.3 and spread[:, 80:].min() > 0.7


def test_fill_stirs_noise_into_unknown_pixels_only_and_follows_the_seed():
    pixels = np.full((16, 16, 3), 128, np.uint8)
    known = np.zeros((16, 16), bool)
    known[:, :8] = True
    filled = fill_unknown(pixels, known, seed=3)
    assert np.array_equal(filled[known], pixels[known])
    unknown_std = filled[~known].astype(np.float64).std() / 255
    assert 0.5 * FILL_NOISE < unknown_std < 1.5 * FILL_NOISE
    assert np.array_equal(filled, fill_unknown(pixels, known, seed=3))
    assert not np.array_equal(filled, fill_unknown(pixels, known, seed=4))


def test_a_picture_larger_than_fill_side_is_spread_small_and_filled_at_full_size():
    width = 3 * FILL_SIDE
    pixels = np.zeros((64, width, 3), np.uint8)
    pixels[:, : width // 2] = (30, 200, 60)
    known = np.zeros((64, width), bool)
    known[:, : width // 2] = True
    filled = fill_unknown(pixels, known, seed=0)
    assert np.array_equal(filled[known], pixels[known])
    margin = filled[:, width // 2 :].reshape(-1, 3).astype(np.float64)
    assert np.allclose(margin.mean(axis=0), (30, 200, 60), atol=3)  # the edge's colour, with the noise around it
    assert 0.5 * FILL_NOISE < margin[:, 0].std() / 255 < 1.5 * FILL_NOISE
