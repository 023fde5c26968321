"""Where the map comes from: an uploaded map, the picture's transparency, the outpainting; none is one error."""

import logging

import numpy as np
import pytest
import torch

from models.errors import InputError
from models.inputs import EditOptions
from models.limits import MAX_MAP_PROMPTS
from models.maps import shaping, sources
from models.maps.sources import NO_SOURCE, extension_of, prepare
from models.pictures.colour import UNTAGGED
from models.pictures.metadata import OutputMetadata
from models.pictures.read import Picture
from models.tooling.pictures import photo, png_bytes
from tests.support.editing import VALID

WIDTH, HEIGHT = 40, 30


def options(**changes) -> EditOptions:
    return EditOptions.from_values({**VALID, **changes})


def picture(alpha: np.ndarray | None = None) -> Picture:
    return Picture(photo(WIDTH, HEIGHT, seed=2), UNTAGGED, OutputMetadata(), alpha)


def prepared(source_picture: Picture, map_path=None, *, segmenter=None, depth=None, **changes):
    edit = options(**changes)
    return prepare(source_picture, map_path, edit, extension_of(edit, WIDTH, HEIGHT), segmenter, depth)


def half_alpha() -> np.ndarray:
    alpha = np.full((HEIGHT, WIDTH), 255, np.uint8)
    alpha[:, WIDTH // 2 :] = 0
    alpha[:, WIDTH // 2 - 1] = 128
    return alpha


def test_nothing_that_says_what_changes_is_one_error_naming_the_ways():
    with pytest.raises(InputError, match="map: required unless") as error:
        prepared(picture())
    assert str(error.value) == NO_SOURCE
    for way in ("a map", "map_prompt", "map_depth", "transparency", "extend_"):
        assert way in NO_SOURCE


def test_an_opaque_alpha_channel_says_nothing_changes():
    with pytest.raises(InputError, match="opaque everywhere"):
        prepared(picture(np.full((HEIGHT, WIDTH), 255, np.uint8)))


def test_transparency_is_the_map_and_opaque_pixels_are_the_input(caplog):
    alpha = half_alpha()
    with caplog.at_level(logging.INFO):
        result = prepared(picture(alpha))
    assert "its transparency is the change map" in caplog.text
    expected = 1 - torch.from_numpy(alpha).float() / 255
    assert torch.equal(result.change_map, expected)
    opaque = alpha == 255
    assert np.array_equal(result.pixels[opaque], picture().pixels[opaque])
    assert not np.array_equal(result.pixels[~opaque], picture().pixels[~opaque])  # filled, not flattened white


def test_an_uploaded_map_wins_over_transparency(tmp_path, caplog):
    change_map = np.zeros((HEIGHT, WIDTH), np.uint8)
    change_map[:5, :5] = 255
    path = tmp_path / "map.png"
    path.write_bytes(png_bytes(change_map))
    with caplog.at_level(logging.WARNING):
        result = prepared(picture(half_alpha()), path)
    assert "flattened onto white" in caplog.text
    assert torch.equal(result.change_map, torch.from_numpy(change_map / 255).float())
    assert np.array_equal(result.pixels, picture().pixels)


def test_outpainting_alone_changes_the_margin_and_seam_only_and_is_never_inverted():
    for invert in (False, True):
        result = prepared(picture(), extend_right=10, invert_map=invert)
        assert result.change_map.shape == (HEIGHT, WIDTH + 10) and result.pixels.shape == (HEIGHT, WIDTH + 10, 3)
        assert torch.all(result.change_map[:, WIDTH:] == 1)
        assert torch.all(result.change_map[:, :10] == 0)
        assert np.array_equal(result.pixels[:, :WIDTH], picture().pixels)


def test_outpainting_with_transparency_keeps_both(caplog):
    result = prepared(picture(half_alpha()), extend_top=6)
    assert result.change_map.shape == (HEIGHT + 6, WIDTH)
    assert torch.all(result.change_map[:6] == 1) and torch.all(result.change_map[6:, WIDTH // 2 :] == 1)
    assert result.change_map[-1, 0] == 0


# --- Maps from words and depth, with forced model outputs ---------------------------------------------------------


class ForcedSegmenter:
    """CLIPSeg's place, answering each phrase with a map given by the test (at a coarse 'model resolution')."""

    def __init__(self, answers: dict[str, torch.Tensor]):
        self.answers = answers
        self.asked: list[list[str]] = []

    def probabilities(self, pixels, prompts):
        self.asked.append(prompts)
        return torch.stack([self.answers[prompt] for prompt in prompts])


class ForcedDepth:
    def __init__(self, nearness: torch.Tensor):
        self.answer = nearness

    def nearness(self, pixels):
        return self.answer


def region(value: float, rows=slice(None), columns=slice(None), shape=(HEIGHT, WIDTH)) -> torch.Tensor:
    probabilities = torch.full(shape, 0.01)
    probabilities[rows, columns] = value
    return probabilities


def test_a_prompt_s_map_is_its_probabilities_over_their_peak_with_a_threshold():
    probabilities = torch.linspace(0, 0.6, WIDTH).repeat(HEIGHT, 1)  # CLIPSeg is never quite sure
    segmenter = ForcedSegmenter({"sky": probabilities})
    change_map = prepared(picture(), map_prompt="sky", segmenter=segmenter).change_map
    normalised = probabilities / 0.6
    expected = ((normalised - sources.PROMPT_THRESHOLD) / (1 - sources.PROMPT_THRESHOLD)).clamp(0, 1)
    expected = torch.where(expected < shaping.NEAR_BLACK, 0.0, expected)
    torch.testing.assert_close(change_map, expected)
    assert change_map.max() == pytest.approx(1.0) and torch.all(change_map[:, : WIDTH // 4] == 0)


def test_several_phrases_are_a_union_each_normalised_by_its_own_peak():
    segmenter = ForcedSegmenter({"sky": region(0.3, rows=slice(0, 10)), "water": region(0.9, rows=slice(20, 30))})
    change_map = prepared(picture(), map_prompt="sky, water ,", segmenter=segmenter).change_map
    assert segmenter.asked == [["sky", "water"]]
    assert torch.all(change_map[:10] == 1) and torch.all(change_map[20:] == 1) and torch.all(change_map[12:18] == 0)


def test_a_phrase_found_nowhere_changes_nothing_and_all_of_them_is_an_error(caplog):
    segmenter = ForcedSegmenter({"sky": region(0.8, rows=slice(0, 10)), "moon": torch.full((HEIGHT, WIDTH), 0.05)})
    change_map = prepared(picture(), map_prompt="sky, moon", segmenter=segmenter).change_map
    assert torch.all(change_map[10:] == 0) and "'moon' is barely in the picture" in caplog.text
    with pytest.raises(InputError, match="map_prompt: 'moon' was not found in the picture; try other words"):
        prepared(picture(), map_prompt="moon", segmenter=segmenter)


def test_too_many_phrases_are_refused():
    with pytest.raises(InputError, match=f"map_prompt: at most {MAX_MAP_PROMPTS} phrases"):
        prepared(picture(), map_prompt=",".join("abcdefghij"), segmenter=ForcedSegmenter({}))


def test_the_negative_prompt_keeps_its_area_after_inversion():
    """'Change everything but the person, and keep the dog too': invert the person, then the dog's area is kept."""
    segmenter = ForcedSegmenter(
        {"person": region(0.9, columns=slice(0, 10)), "dog": region(0.9, columns=slice(30, 40))}
    )
    change_map = prepared(
        picture(), map_prompt="person", map_negative_prompt="dog", invert_map=True, segmenter=segmenter
    ).change_map
    assert torch.all(change_map[:, :10] == 0) and torch.all(change_map[:, 30:] == 0)
    assert torch.all(change_map[:, 12:28] == 1)


def test_sources_given_together_multiply(tmp_path):
    """An uploaded map with map_prompt changes only the prompt's area, only as much as the map says."""
    half = np.zeros((HEIGHT, WIDTH), np.uint8)
    half[:, WIDTH // 2 :] = 128
    path = tmp_path / "map.png"
    path.write_bytes(png_bytes(half))
    segmenter = ForcedSegmenter({"sky": region(0.9, rows=slice(0, 15))})
    change_map = prepared(picture(), path, map_prompt="sky", segmenter=segmenter).change_map
    assert torch.allclose(change_map[:15, WIDTH // 2 :], torch.tensor(128 / 255))
    assert torch.all(change_map[15:] == 0) and torch.all(change_map[:, : WIDTH // 2] == 0)


@pytest.mark.parametrize(("end", "share"), [("far", 1.0), ("near", 1.0), ("far", 0.5)])
def test_depth_maps_rise_toward_the_chosen_end_over_the_chosen_share(end, share):
    nearness = torch.linspace(10, 0, HEIGHT)[:, None].repeat(1, WIDTH)  # near at the top, far at the bottom
    depth = ForcedDepth(nearness)
    change_map = prepared(picture(), map_depth=end, map_depth_range=share, depth=depth).change_map
    column = change_map[:, 0]
    rising = column.flip(0) if end == "near" else column
    assert rising[0] == 0 and rising[-1] == 1 and torch.all(rising.diff() >= 0)
    if share == 0.5:
        assert torch.all(column[: HEIGHT // 2 - 1] == 0)  # the nearer half kept exactly


def test_a_flat_depth_is_one_distance_with_a_warning(caplog):
    change_map = prepared(picture(), map_depth="far", depth=ForcedDepth(torch.zeros(HEIGHT, WIDTH))).change_map
    assert torch.all(change_map == 0.5) and "sees no depth differences" in caplog.text


def test_an_uploaded_map_s_near_white_is_kept_when_inverted_and_grow_acts_on_the_inverted_area(tmp_path):
    keep = np.full((HEIGHT, WIDTH), 254, np.uint8)  # a white-keeps map, a little off white
    keep[10:20, 10:20] = 0
    path = tmp_path / "keep.png"
    path.write_bytes(png_bytes(keep))
    change_map = prepared(picture(), path, invert_map=True, map_grow=2).change_map
    assert torch.all(change_map[8:22, 8:22] == 1)
    assert change_map[0, 0] == 0 and change_map[25, 35] == 0


@pytest.mark.parametrize(("changes", "columns"), [({}, slice(0, 4)), ({"invert_map": True}, slice(4, 8))],
                         ids=["plain", "inverted"])  # fmt: skip
def test_pixels_a_fill_touched_are_the_input_wherever_the_final_map_keeps_them(changes, columns):
    """Alpha 254 is a map of 1/255, floored to black; inverted, alpha 0 is black: both kept, so the input's."""
    alpha = np.full((HEIGHT, WIDTH), 255, np.uint8)
    alpha[:, :4], alpha[:, 4:8] = 254, 0
    result = prepared(picture(alpha), **changes)
    kept = (result.change_map == 0).numpy()
    assert kept[:, columns].all() and np.array_equal(result.pixels[kept], picture().pixels[kept])


def test_partly_transparent_pixels_start_between_their_own_colour_and_the_fill():
    alpha = np.full((HEIGHT, WIDTH), 255, np.uint8)
    alpha[:, 20:30], alpha[:, 30:] = 128, 0
    own = picture().pixels
    flattened = np.round(own * (alpha[:, :, None] / 255) + 255 * (1 - alpha[:, :, None] / 255)).astype(np.uint8)
    start = sources.start_from_fill(flattened, alpha, seed=1)
    assert np.array_equal(start[:, :20], own[:, :20])
    fill = sources.fill_unknown(flattened, alpha == 255, 1)
    assert np.array_equal(start[:, 30:], fill[:, 30:])
    expected = own[:, 20:30] * (128 / 255) + fill[:, 20:30].astype(np.float64) * (127 / 255)
    assert np.abs(start[:, 20:30] - expected).max() <= 1.0


def test_a_map_prompt_of_commas_only_is_one_line():
    with pytest.raises(InputError, match="map_prompt: no words between the commas in ', ,'"):
        prepared(picture(), map_prompt=" , ,", segmenter=ForcedSegmenter({}))


def test_the_negative_prompt_keeps_its_area_however_far_grow_and_blur_reach():
    half = torch.zeros(HEIGHT, WIDTH)
    half[:, : WIDTH // 2] = 0.9
    segmenter = ForcedSegmenter({"sky": half, "tree": region(0.9, columns=slice(WIDTH // 2, WIDTH // 2 + 6))})
    change_map = prepared(
        picture(), map_prompt="sky", map_negative_prompt="tree", map_grow=8, map_blur=4, segmenter=segmenter
    ).change_map
    assert torch.all(change_map[:, WIDTH // 2 : WIDTH // 2 + 6] == 0)
    assert change_map[:, WIDTH // 2 + 6 : WIDTH // 2 + 8].max() > 0  # grown past the tree
