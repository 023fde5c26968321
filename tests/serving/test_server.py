"""The predictor served by Cog's real HTTP server, with real requests and data-URI files."""

import numpy as np
import pytest

from models.tooling.cog_server import cog_server, data_uri, decode_output, predict, wait_until_ready
from models.tooling.pictures import photo, png_bytes

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    with cog_server(tiny_weights, tmp_path_factory.mktemp("server") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def picture():
    return photo(320, 240, seed=1)


@pytest.fixture(scope="module")
def files(picture):
    change_map = np.zeros((120, 160), np.uint8)
    change_map[:, 80:] = 255
    return {"image": data_uri(png_bytes(picture)), "map": data_uri(png_bytes(change_map))}


def test_edit_returns_webp_at_the_input_size_and_logs_what_a_user_needs(server, files):
    assert wait_until_ready(server)
    result = predict(server, {**files, "prompt": "a lighthouse", "seed": 3})
    assert result["status"] == "succeeded", result.get("error")
    [output] = result["output"]
    assert output.startswith("data:image/webp;base64,")
    assert decode_output(output).size == (320, 240)
    logs = result["logs"]
    assert "seed: 3" in logs
    assert "map: 160x120 resized to the image's 320x240" in logs
    assert "editing 320x240 at 1152x896" in logs
    assert "denoising step 4/4" in logs
    assert "prediction took" in logs


def test_png_batch_keeps_black_areas_exactly(server, files, picture):
    assert wait_until_ready(server)
    result = predict(server, {**files, "num_outputs": 2, "output_format": "png", "seed": 4})
    assert result["status"] == "succeeded", result.get("error")
    outputs = [np.asarray(decode_output(uri).convert("RGB")) for uri in result["output"]]
    assert len(outputs) == 2 and not np.array_equal(outputs[0], outputs[1])
    for output in outputs:
        assert np.array_equal(output[:, :120], picture[:, :120])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": 99}, "steps: must be a whole number from 1 to 16"),
        ({"strength": "lots"}, "strength: must be a number"),
        ({"output_format": "gif"}, "output_format: must be one of webp, png, jpg"),
        ({"map": None}, "map: required"),
        ({"image": data_uri(b"not a picture", "text/plain")}, "image: not a readable picture"),
    ],
)
def test_bad_input_is_one_clear_line(server, files, changes, message):
    inputs = {key: value for key, value in {**files, **changes}.items() if value is not None}
    assert wait_until_ready(server), "Cog answers 409 while it frees the previous request's slot"
    result = predict(server, inputs)
    assert result["status"] == "failed"
    assert message in result["error"]
    assert "Traceback" not in result["error"] and "\n" not in result["error"].strip()


def test_still_ready_and_working_after_errors(server, files):
    assert wait_until_ready(server)
    predict(server, {**files, "steps": 0})
    assert wait_until_ready(server)
    assert predict(server, {**files, "steps": 1})["status"] == "succeeded"
