"""The map inputs through Cog's HTTP server: no map with transparency or outpainting, the map returned, and one
clear line for each bad value."""

import numpy as np
import pytest

from models.maps.sources import NO_SOURCE
from models.tooling.cog_server import data_uri, decode_output, predict, running_cog_server, wait_until_ready
from models.tooling.pictures import FAINT, faint_map, photo, png_bytes

pytestmark = pytest.mark.server

WIDTH, HEIGHT = 64, 48
PICTURE = photo(WIDTH, HEIGHT, seed=3)


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("maps-server")
    with running_cog_server(tiny_weights, folder / "server.log") as running:
        yield running


def ask(server, **inputs) -> dict:
    assert wait_until_ready(server.url)
    return predict(server.url, {"image": data_uri(png_bytes(PICTURE)), "output_format": "png", "seed": 2, **inputs})


def pictures(result: dict) -> list[np.ndarray]:
    assert result["status"] == "succeeded", result.get("error")
    return [np.asarray(decode_output(uri)) for uri in result["output"]]


def test_return_map_gives_the_map_used_last_as_a_16_bit_png(server):
    result = ask(server, map=data_uri(faint_map(WIDTH, HEIGHT)), return_map=True, num_outputs=2)
    first, second, change_map = pictures(result)
    assert first.shape == second.shape == (HEIGHT, WIDTH, 3)
    assert change_map.shape == (HEIGHT, WIDTH) and change_map.dtype == np.uint16
    assert np.all(change_map[:, : WIDTH // 2] == 0)
    assert np.all(np.abs(change_map[:, WIDTH // 2 :].astype(int) - round(FAINT / 255 * 65535)) <= 1)
    assert np.array_equal(first[:, : WIDTH // 2 - 20], PICTURE[:, : WIDTH // 2 - 20])
    assert len(pictures(ask(server, map=data_uri(faint_map(WIDTH, HEIGHT))))) == 1  # off by default


def test_no_map_an_image_with_transparency_changes_its_transparent_part(server):
    alpha = np.full((HEIGHT, WIDTH), 255, np.uint8)
    alpha[:, 40:] = 0
    result = ask(server, image=data_uri(png_bytes(np.dstack([PICTURE, alpha]))), return_map=True)
    output, change_map = pictures(result)
    assert np.array_equal(output[:, :16], PICTURE[:, :16])
    assert np.all(change_map[:, 40:] == 65535) and np.all(change_map[:, :39] == 0)
    assert "its transparency is the change map" in result["logs"]


def test_extend_outpaints_a_larger_canvas(server):
    result = ask(server, extend_left=8, extend_right=32, extend_top=8, extend_bottom=4, return_map=True)
    output, change_map = pictures(result)
    assert output.shape == (HEIGHT + 12, WIDTH + 40, 3) and change_map.shape == (HEIGHT + 12, WIDTH + 40)
    new_area = np.ones(change_map.shape, bool)
    new_area[8 : 8 + HEIGHT, 8 : 8 + WIDTH] = False
    assert np.all(change_map[new_area] == 65535)
    assert "extend: canvas 104x60 from 64x48 (left 8, right 32, top 8, bottom 4" in result["logs"]


def test_map_prompt_and_map_depth_run_the_loaded_models(server):
    """On the tiny random models: the real loading, preprocessing and model calls; the maps' arithmetic is checked
    with forced outputs in test_sources.py."""
    result = ask(server, map_prompt="sky, water", map_negative_prompt="boat", return_map=True)
    output, change_map = pictures(result)
    assert output.shape == (HEIGHT, WIDTH, 3) and change_map.shape == (HEIGHT, WIDTH)
    assert "map_prompt: 'sky' found with a best match of" in result["logs"]
    assert "map_negative_prompt: 'boat' found" in result["logs"]
    assert {"map_prompt", "map_negative_prompt"} <= set(result["metrics"]["timings"])
    result = ask(server, map_depth="far", map_depth_range=0.5, return_map=True)
    output, change_map = pictures(result)
    assert change_map.shape == (HEIGHT, WIDTH) and change_map.min() == 0 < change_map.max()
    assert "map_depth" in result["metrics"]["timings"]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, NO_SOURCE),
        ({"map_depth": "sideways"}, "map_depth: must be one of off, near, far, got 'sideways'"),
        ({"map_depth": "far", "map_depth_range": 0}, "map_depth_range: must be from 0.05 to 1, got 0"),
        ({"map_prompt": "x" * 501}, "map_prompt: at most 500 characters, got 501"),
        ({"map_negative_prompt": "person"}, NO_SOURCE),
        ({"extend_left": WIDTH + 1}, f"extend_left: at most {WIDTH} pixels for this picture (its width"),
        ({"extend_top": -1}, "extend_top: must be a whole number from 0 to 2048, got -1"),
        ({"return_map": "yes"}, "return_map: must be true or false, got 'yes'"),
    ],
    ids=[
        "no-source",
        "depth-choice",
        "depth-range",
        "prompt-length",
        "negative-alone",
        "extend-beyond-the-picture",
        "extend-negative",
        "return-map-text",
    ],
)
def test_bad_map_inputs_get_one_clear_line(server, inputs, message):
    result = ask(server, **inputs)
    assert result["status"] == "failed" and message in result["error"], result.get("error")
    assert "Traceback" not in result["error"]
