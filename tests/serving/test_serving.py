"""Serving under bad input, load and faults: every request gets a picture or one clear error line, and the
server stays ready and loses nothing.

Most cases go through Cog's real HTTP server. Cases that would need a model run use small pictures with an
all-black map (no model work at all) or a faint map (only the last of 4 steps runs), since the working size is
always about one megapixel. The soak is marked `soak`: deselect it with `-m "not soak"`.
"""

import io
import json
import re
import tempfile
import time
import weakref
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from cog import Path as CogPath
from PIL import Image

from models import editor, heap, memory, service
from models.errors import InputError, NotEnoughMemoryError
from models.inputs import INPUTS, REQUIRED, EditOptions
from models.limits import (
    MAP_ASPECT_TOLERANCE,
    MAX_GUIDANCE_SCALE,
    MAX_INPUT_BYTES,
    MAX_INPUT_PIXELS,
    MAX_MAP_BLUR,
    MAX_MAP_GROW,
    MAX_NUM_OUTPUTS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    MIN_STEPS,
)
from models.loras.cache import LoraCache
from models.maps import shaping
from models.pictures.read import picture_size, read_image
from models.pipeline import DifferentialDiffusionPipeline
from models.service import EditService
from models.tooling.cog_server import (
    cancel,
    data_uri,
    decode_output,
    file_server,
    health,
    predict,
    predict_async,
    running_cog_server,
    wait_until_ready,
    webhook_receiver,
)
from models.tooling.pictures import FAINT, faint_map, flat_map, photo, png_bytes
from models.tooling.soak import SOAK_RSS_MARGIN, SOAK_WARM_UP, run_soak, write_soak_inputs
from models.validation import fetched_file
from predict import Predictor
from tests.support.editing import VALID, png_header_only

pytestmark = pytest.mark.server

WIDTH, HEIGHT = 64, 48
PICTURE = photo(WIDTH, HEIGHT, seed=5)


def encoded(picture: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, fmt, **options)
    return buffer.getvalue()


BASE_INPUTS = {
    "image": data_uri(png_bytes(PICTURE)),
    "map": data_uri(flat_map(WIDTH, HEIGHT)),
    "output_format": "png",
    "seed": 1,
}


def ask(server, changes: dict) -> dict:
    """One synchronous prediction from the base inputs; None in changes drops that input."""
    assert wait_until_ready(server.url), "the server is not READY before the request"
    inputs = {key: value for key, value in {**BASE_INPUTS, **changes}.items() if value is not None}
    return predict(server.url, inputs)


def outputs(result: dict) -> list[np.ndarray]:
    assert result["status"] == "succeeded", result.get("error")
    return [np.asarray(decode_output(uri).convert("RGB")) for uri in result["output"]]


def decoded_as_the_predictor_does(content: bytes, tmp_path: Path) -> np.ndarray:
    path = tmp_path / "expected"
    path.write_bytes(content)
    return read_image(path)


def assert_one_clear_line(error: str, expected: str) -> None:
    """The expected text, on one line, with no traceback and no path of the server's files."""
    assert expected in error, error
    assert "\n" not in error.strip() and "Traceback" not in error, error
    assert not re.search(r"/(tmp|work|root|usr|home|etc|proc)/|\.py\b", error), error


@pytest.fixture(scope="module")
def server_tmp(tmp_path_factory) -> Path:
    """The worker's temporary folder: where Cog puts fetched inputs and the predictor its outputs."""
    return tmp_path_factory.mktemp("server-tmp")


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory, server_tmp):
    log_path = tmp_path_factory.mktemp("serving") / "server.log"
    with running_cog_server(tiny_weights, log_path, env={"TMPDIR": str(server_tmp)}) as running:
        yield running


# --- Bad input: one clear line naming the input and what is allowed -------------------------------------------


def truncated_png() -> bytes:
    content = png_bytes(photo(64, 64, seed=2))
    return content[: len(content) // 2]


def huge_png() -> bytes:
    """A real 56-megapixel picture in a few KB: one bit per pixel, all zeros."""
    return encoded(Image.new("1", (8000, 7000)))


ERROR_CASES = [
    pytest.param(
        lambda: {"image": data_uri(b"just some text", "text/plain")}, "image: not a readable picture", id="text"
    ),
    pytest.param(lambda: {"image": "data:,"}, "image: the file is empty", id="empty-file"),
    pytest.param(
        lambda: {"image": data_uri(truncated_png())}, "image: the file is truncated or corrupt", id="truncated"
    ),
    pytest.param(
        lambda: {"image": data_uri(png_header_only(40000, 40000))},
        f"image: larger than {MAX_INPUT_PIXELS:,} pixels",
        id="decompression-bomb",
    ),
    pytest.param(
        lambda: {"image": data_uri(huge_png())},
        f"image: 8000x7000 is larger than {MAX_INPUT_PIXELS:,} pixels",
        id="huge-picture",
    ),
    pytest.param(
        lambda: {"image": data_uri(b"%!PS-Adobe-3.0 EPSF-3.0\n", "application/postscript")},
        "image: not a readable picture; allowed: PNG, JPEG, WebP, GIF, BMP, TIFF",
        id="eps-never-runs-ghostscript",
    ),
    pytest.param(lambda: {"map": data_uri(b"\x00" * 100, "image/png")}, "map: not a readable picture", id="map-junk"),
    pytest.param(
        lambda: {"map": data_uri(png_header_only(40000, 40000))}, "map: larger than", id="map-decompression-bomb"
    ),
    pytest.param(
        lambda: {"map": data_uri(flat_map(WIDTH, WIDTH))},
        "map: its aspect ratio (64x64) differs from the image's (64x48); give a map of the same aspect ratio",
        id="map-other-aspect",
    ),
    pytest.param(lambda: {"steps": 0}, "steps: must be a whole number from 1 to 16, got 0", id="steps-0"),
    pytest.param(lambda: {"steps": 17}, "steps: must be a whole number from 1 to 16, got 17", id="steps-17"),
    pytest.param(lambda: {"steps": "4"}, "steps: must be a whole number from 1 to 16, got '4'", id="steps-text"),
    pytest.param(lambda: {"steps": 2.5}, "steps: must be a whole number from 1 to 16, got 2.5", id="steps-fraction"),
    pytest.param(lambda: {"strength": 1.5}, "strength: must be from 0 to 1, got 1.5", id="strength-high"),
    pytest.param(lambda: {"strength": "lots"}, "strength: must be a number from 0 to 1", id="strength-text"),
    pytest.param(lambda: {"num_outputs": 0}, "num_outputs: must be a whole number from 1 to 4", id="num-outputs-0"),
    pytest.param(lambda: {"num_outputs": 5}, "num_outputs: must be a whole number from 1 to 4", id="num-outputs-5"),
    pytest.param(lambda: {"guidance_scale": 3.5}, "guidance_scale: must be from 0 to 3", id="guidance-high"),
    pytest.param(lambda: {"seed": -1}, f"seed: must be a whole number from 0 to {MAX_SEED}", id="seed-negative"),
    pytest.param(lambda: {"seed": "abc"}, f"seed: must be a whole number from 0 to {MAX_SEED}", id="seed-text"),
    pytest.param(lambda: {"invert_map": "yes"}, "invert_map: must be true or false, got 'yes'", id="invert-text"),
    pytest.param(
        lambda: {"output_format": "gif"}, "output_format: must be one of webp, png, jpg, got 'gif'", id="format-gif"
    ),
    pytest.param(
        lambda: {"output_quality": 101}, "output_quality: must be a whole number from 1 to 100", id="quality-101"
    ),
    pytest.param(
        lambda: {"prompt": "a" * (MAX_PROMPT_CHARS + 1)},
        f"prompt: at most {MAX_PROMPT_CHARS} characters, got {MAX_PROMPT_CHARS + 1}",
        id="prompt-over-limit",
    ),
    pytest.param(lambda: {"prompt": 42}, "prompt: must be text, got 42", id="prompt-number"),
    pytest.param(
        lambda: {"negative_prompt": "a" * (MAX_PROMPT_CHARS + 1)},
        f"negative_prompt: at most {MAX_PROMPT_CHARS} characters",
        id="negative-prompt-over-limit",
    ),
    pytest.param(lambda: {"image": None}, "image: required; give a picture file", id="image-missing"),
    pytest.param(lambda: {"map": None}, "map: required unless something else says what changes", id="map-missing"),
    pytest.param(
        lambda: {"image": "/etc/passwd"},
        "image: give a file (an upload, a data URI or an http(s) URL); paths and other text are not accepted",
        id="server-path",
    ),
    pytest.param(
        lambda: {"map": "file:///etc/passwd"},
        "map: give a file (an upload, a data URI or an http(s) URL); paths and other text are not accepted",
        id="file-url",
    ),
    pytest.param(
        lambda: {"image": {"url": "http://127.0.0.1:9/a.png"}},
        "image: give a file (an upload, a data URI or an http(s) URL), not a JSON object",
        id="json-object-as-file",
    ),
    # Cog's own answers, before the predictor runs: an unknown input (Cog drops it instead when it has the
    # schema `cog build` writes) and a URL it cannot fetch.
    pytest.param(
        lambda: {"mask": "http://127.0.0.1:9/mask.png"}, "unexpected keyword argument 'mask'", id="unknown-input"
    ),
    pytest.param(
        lambda: {"lora_weights": "http://127.0.0.1:9/lora.safetensors"},
        "lora_weights: 127.0.0.1 resolves to 127.0.0.1, which is not a public address",
        id="lora-on-a-private-address",
    ),
    pytest.param(
        lambda: {"image": "http://127.0.0.1:9/missing.png"}, "Input validation error", id="url-that-cannot-be-fetched"
    ),
]


@pytest.mark.parametrize(("changes", "message"), ERROR_CASES)
def test_bad_input_gets_one_clear_line(server, changes, message):
    result = ask(server, changes())
    assert result["status"] == "failed", result
    assert_one_clear_line(result["error"], message)


# --- Inputs a user would expect to work: a sensible picture -----------------------------------------------------


def test_a_1x1_picture_is_edited_and_comes_back_1x1(server):
    result = ask(server, {"image": data_uri(png_bytes(PICTURE[:1, :1])), "map": data_uri(flat_map(1, 1, FAINT))})
    [output] = outputs(result)
    assert output.shape == (1, 1, 3)
    assert "1 of 4 steps active" in result["logs"]


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (WIDTH, HEIGHT), colour) for colour in ("white", "black")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


PICTURE_KINDS = {
    "animated-gif": animated_gif,
    "palette": lambda: encoded(Image.fromarray(PICTURE).quantize(16)),
    "16-bit": lambda: encoded(Image.fromarray(PICTURE[:, :, 0].astype(np.uint16) * 257)),
    "cmyk-jpeg": lambda: encoded(Image.fromarray(PICTURE).convert("CMYK"), "JPEG", quality=95),
    "alpha": lambda: encoded(Image.fromarray(np.dstack([PICTURE, np.full((HEIGHT, WIDTH), 128, np.uint8)]))),
    "grey-bmp": lambda: encoded(Image.fromarray(PICTURE[:, :, 1]), "BMP"),
    "webp": lambda: encoded(Image.fromarray(PICTURE), "WEBP", lossless=True),
    "tiff": lambda: encoded(Image.fromarray(PICTURE), "TIFF"),
}


@pytest.mark.parametrize("kind", PICTURE_KINDS)
def test_any_picture_kind_comes_back_as_rgb_at_its_size(server, kind, tmp_path):
    """With an all-black map the output is the picture exactly as the predictor decodes it (as RGB)."""
    content = PICTURE_KINDS[kind]()
    [output] = outputs(ask(server, {"image": data_uri(content, "application/octet-stream")}))
    assert np.array_equal(output, decoded_as_the_predictor_does(content, tmp_path))


def test_exif_rotated_picture_comes_back_upright_at_the_rotated_size(server):
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise
    stored = Image.fromarray(PICTURE)  # 64x48 as stored, 48x64 as displayed
    content = encoded(stored, "JPEG", quality=95, exif=exif)
    [output] = outputs(ask(server, {"image": data_uri(content, "image/jpeg"), "map": data_uri(flat_map(48, 64))}))
    assert output.shape == (64, 48, 3)


def test_map_of_another_size_with_the_same_aspect_is_resized(server):
    [output] = outputs(ask(server, {"map": data_uri(flat_map(4 * WIDTH, 4 * HEIGHT))}))
    assert np.array_equal(output, PICTURE)


def test_all_black_map_returns_the_input_exactly_without_running_the_model(server):
    result = ask(server, {"num_outputs": 2})
    assert all(np.array_equal(output, PICTURE) for output in outputs(result))
    assert "map is all black" in result["logs"] and "denoising" not in result["logs"]


def test_transparent_map_areas_keep_the_picture(server):
    transparent_white = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
    transparent_white[..., :3] = 255
    [output] = outputs(ask(server, {"map": data_uri(png_bytes(transparent_white))}))
    assert np.array_equal(output, PICTURE)


def test_colour_map_uses_its_luminance(server):
    colour_map = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    colour_map[:, WIDTH // 2 :] = (60, 20, 120)  # luminance 43 of 255
    result = ask(server, {"map": data_uri(png_bytes(colour_map))})
    [output] = outputs(result)
    assert "1 of 4 steps active" in result["logs"]
    assert np.array_equal(output[:, :8], PICTURE[:, :8]) and not np.array_equal(output, PICTURE)


def test_uniform_grey_map_changes_every_pixel(server):
    result = ask(server, {"map": data_uri(flat_map(WIDTH, HEIGHT, FAINT))})
    [output] = outputs(result)
    assert (np.abs(output.astype(int) - PICTURE).max(axis=2) > 0).mean() > 0.5


def test_long_prompt_within_the_limit_is_truncated_by_clip_with_a_warning(server):
    prompt = ("a lighthouse on a cliff at dusk, " * 60)[:MAX_PROMPT_CHARS]
    result = ask(server, {"prompt": prompt, "map": data_uri(faint_map(WIDTH, HEIGHT))})
    assert result["status"] == "succeeded", result.get("error")
    assert "truncated" in result["logs"]


def test_empty_prompt_is_accepted(server):
    assert len(outputs(ask(server, {"prompt": ""}))) == 1


def test_picture_given_as_a_url_is_fetched_by_cog(server, tmp_path):
    (tmp_path / "picture.png").write_bytes(png_bytes(PICTURE))
    with file_server(tmp_path) as url:
        [output] = outputs(ask(server, {"image": f"{url}/picture.png"}))
    assert np.array_equal(output, PICTURE)


def test_after_the_battery_a_good_request_succeeds_and_the_server_is_ready(server):
    result = ask(server, {"map": data_uri(faint_map(WIDTH, HEIGHT)), "output_format": None})
    [uri] = result["output"]
    assert uri.startswith("data:image/webp;base64,") and decode_output(uri).size == (WIDTH, HEIGHT)
    assert wait_until_ready(server.url) and health(server.url) == "READY"


# --- Security: only files Cog fetched are ever read --------------------------------------------------------------


def test_paths_to_files_of_the_server_are_never_read(server, tmp_path):
    """A real picture outside the worker's temporary folder, named by path, file:// URL or relative path."""
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes(PICTURE))
    relative = Path("..") / ".." / secret.relative_to("/")
    for reference in (str(secret), f"file://{secret}", str(relative), str(tmp_path)):
        result = ask(server, {"image": reference})
        assert result["status"] == "failed"
        assert_one_clear_line(result["error"], "image: give a file (an upload, a data URI or an http(s) URL)")


@pytest.fixture
def temporary_folder(tmp_path, monkeypatch) -> Path:
    """tmp_path as the process's temporary folder, where Cog would put fetched files."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_only_regular_files_directly_in_the_temporary_folder_are_accepted(temporary_folder, tmp_path_factory):
    fetched = temporary_folder / "tmpabc123file.png"
    fetched.write_bytes(png_bytes(PICTURE))
    assert fetched_file("image", CogPath(fetched)) == fetched

    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    outside.write_bytes(b"secret")
    earlier_output = temporary_folder / "outputs-x" / "out-0.png"
    earlier_output.parent.mkdir()
    earlier_output.write_bytes(b"someone else's picture")
    link = temporary_folder / "link.png"
    link.symlink_to(outside)
    for refused in (outside, earlier_output, link, temporary_folder / "outputs-x", temporary_folder / "missing.png"):
        with pytest.raises(InputError, match=r"^image: give a file .*not a path on the server"):
            fetched_file("image", CogPath(refused))


# --- Limits: each named constant, at and just past its boundary ---------------------------------------------------


def test_file_size_limit(tmp_path):
    at_limit, over_limit = tmp_path / "at", tmp_path / "over"
    for path, size in ((at_limit, MAX_INPUT_BYTES), (over_limit, MAX_INPUT_BYTES + 1)):
        with open(path, "wb") as sparse:
            sparse.truncate(size)
    with pytest.raises(InputError, match="not a readable picture"):
        read_image(at_limit)
    with pytest.raises(InputError, match=rf"^image: .* at most {MAX_INPUT_BYTES // 2**20} MiB"):
        read_image(over_limit)


def test_pixel_limit_is_checked_from_the_header(tmp_path):
    at_limit, over_limit = tmp_path / "at.png", tmp_path / "over.png"
    at_limit.write_bytes(png_header_only(MAX_INPUT_PIXELS // 1000, 1000))
    over_limit.write_bytes(png_header_only(MAX_INPUT_PIXELS // 1000 + 1, 1000))
    assert picture_size(at_limit) == (MAX_INPUT_PIXELS // 1000, 1000)
    with pytest.raises(InputError, match=rf"^image: .*larger than {MAX_INPUT_PIXELS:,} pixels"):
        picture_size(over_limit)


@pytest.mark.parametrize(
    ("name", "allowed", "refused"),
    [
        ("steps", (MIN_STEPS, MAX_STEPS), (MIN_STEPS - 1, MAX_STEPS + 1)),
        ("num_outputs", (1, MAX_NUM_OUTPUTS), (0, MAX_NUM_OUTPUTS + 1)),
        ("prompt", ("a" * MAX_PROMPT_CHARS,), ("a" * (MAX_PROMPT_CHARS + 1),)),
        ("negative_prompt", ("a" * MAX_PROMPT_CHARS,), ("a" * (MAX_PROMPT_CHARS + 1),)),
        ("guidance_scale", (MAX_GUIDANCE_SCALE,), (MAX_GUIDANCE_SCALE + 0.01,)),
        ("seed", (0, MAX_SEED), (-1, MAX_SEED + 1)),
        ("map_grow", (0, MAX_MAP_GROW), (-1, MAX_MAP_GROW + 1)),
        ("map_blur", (0, MAX_MAP_BLUR), (-1, MAX_MAP_BLUR + 1)),
    ],
)
def test_request_limits(name, allowed, refused):
    for value in allowed:
        EditOptions.from_values({**VALID, name: value})
    for value in refused:
        with pytest.raises(InputError, match=rf"^{name}: "):
            EditOptions.from_values({**VALID, name: value})


def test_map_aspect_tolerance():
    width, height = 1000, 500
    inside = torch.zeros(height, round(width * (1 + MAP_ASPECT_TOLERANCE * 0.9)))
    outside = torch.zeros(height, round(width * (1 + MAP_ASPECT_TOLERANCE * 1.1)))
    assert shaping.fit_to_image(inside, width, height).shape == (height, width)
    with pytest.raises(InputError, match=r"^map: its aspect ratio"):
        shaping.fit_to_image(outside, width, height)


# --- Faults ------------------------------------------------------------------------------------------------------


def test_requests_while_busy_get_409_and_the_running_prediction_is_unharmed(server):
    """Cog 0.23 runs one prediction at a time (max concurrency 1 for a sync run()) and does not queue."""
    assert wait_until_ready(server.url)
    with webhook_receiver() as webhook:
        faint = {**BASE_INPUTS, "map": data_uri(faint_map(WIDTH, HEIGHT)), "seed": 9}
        running = predict_async(server.url, faint, webhook.url)
        busy_sync = requests.post(f"{server.url}/predictions", json={"input": BASE_INPUTS}, timeout=30)
        busy_async = requests.post(
            f"{server.url}/predictions",
            json={"input": BASE_INPUTS},
            headers={"Prefer": "respond-async"},
            timeout=30,
        )
        assert health(server.url) == "BUSY"
        final = webhook.final(running)
    for busy in (busy_sync, busy_async):
        assert busy.status_code == 409
        assert busy.json() == {"error": "At capacity - all prediction slots busy", "status": "failed"}
    [output] = outputs(final)
    [again] = outputs(ask(server, {"map": data_uri(faint_map(WIDTH, HEIGHT)), "seed": 9}))
    assert np.array_equal(output, again)


def log_events(log_path: Path, prediction_id: str) -> list[tuple[float, str]]:
    """(seconds since the epoch, message) of each server log line about one prediction."""
    events = []
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        fields = record.get("fields", {})
        if fields.get("prediction_id") == prediction_id:
            stamp = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
            events.append((stamp, fields.get("message", "")))
    return events


def denoising_steps(events: list[tuple[float, str]]) -> list[float]:
    return [stamp for stamp, message in events if message.startswith("denoising step")]


def test_cancel_stops_within_one_step_frees_memory_and_leaves_no_state(server):
    """A seeded edit, then a long edit cancelled mid-denoise and a failing one, then the seeded edit again."""
    seeded = {"map": data_uri(faint_map(WIDTH, HEIGHT)), "seed": 21}
    before = outputs(ask(server, seeded))
    assert wait_until_ready(server.url)
    rss_before = server.worker_rss()

    long_edit = {**BASE_INPUTS, "map": data_uri(flat_map(WIDTH, HEIGHT, 255)), "steps": 16, "num_outputs": 4}
    with webhook_receiver() as webhook:
        prediction = predict_async(server.url, long_edit, webhook.url)
        deadline = time.monotonic() + 120
        while len(denoising_steps(log_events(server.log_path, prediction))) < 2:
            assert time.monotonic() < deadline, "the long edit never reached its second step"
            time.sleep(0.02)
        cancelled_at = time.monotonic()
        cancel(server.url, prediction)
        started_by_cancel = len(denoising_steps(log_events(server.log_path, prediction)))
        final = webhook.final(prediction)
        stopped_after = time.monotonic() - cancelled_at

    first, second = denoising_steps(log_events(server.log_path, prediction))[:2]
    assert final["status"] == "canceled"
    assert "prediction took" not in final["logs"]
    steps_run = final["logs"].count("denoising step")
    assert steps_run <= started_by_cancel + 1, f"{steps_run} of 16 steps ran, {started_by_cancel} by the cancel"
    assert stopped_after < (second - first) + 0.5, f"stopped {stopped_after:.2f}s after the cancel"

    assert wait_until_ready(server.url)
    assert server.worker_rss() < rss_before + 32 * 2**20, "the cancelled edit's memory was not freed"
    assert ask(server, {"map": data_uri(flat_map(2 * WIDTH, WIDTH))})["status"] == "failed"
    after = outputs(ask(server, seeded))
    assert all(np.array_equal(b, a) for b, a in zip(before, after, strict=True))


def run_inputs(image: Path, change_map: Path, **changes) -> dict:
    """Every input of Predictor.run, as Cog would pass them (calling run() directly has no Input defaults): each
    table default, the two files and a few fixed values."""
    defaults = {name: spec.default for name, spec in INPUTS.items() if spec.default is not REQUIRED}
    fixed = {"prompt": "a cat", "seed": 3, "output_format": "png"}
    return {**defaults, **fixed, "image": CogPath(image), "map": CogPath(change_map), **changes}


@pytest.fixture
def predictor(pipeline, temporary_folder) -> Predictor:
    """The predictor in this process, on the session's tiny pipeline (setup() would load it again)."""
    runner = Predictor()
    runner.service = EditService(pipeline, LoraCache(temporary_folder / "loras"))
    runner.output_dir = temporary_folder / "outputs"
    return runner


@pytest.fixture
def fetched(temporary_folder) -> SimpleNamespace:
    """Input files as Cog leaves them: directly in the temporary folder."""
    files = {"image": png_bytes(PICTURE), "black": flat_map(WIDTH, HEIGHT), "faint": faint_map(WIDTH, HEIGHT)}
    for name, content in files.items():
        (temporary_folder / f"tmp{name}.png").write_bytes(content)
    return SimpleNamespace(**{name: temporary_folder / f"tmp{name}.png" for name in files})


def test_the_heap_is_trimmed_once_per_prediction_after_the_outputs_are_written(predictor, fetched, monkeypatch):
    """The encoders' buffers are freed before the trim, so it hands them back too; a failed prediction trims as well."""
    events = []
    written = service.write_pictures
    monkeypatch.setattr(service, "write_pictures", lambda *args: events.append("write") or written(*args))
    monkeypatch.setattr(heap, "trim", lambda: events.append("trim"))
    predictor.run(**run_inputs(fetched.image, fetched.black))
    assert events == ["write", "trim"]
    events.clear()
    with pytest.raises(InputError):
        predictor.run(**run_inputs(fetched.image, fetched.black, map_grow=-1))
    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="boom"):
        patch.setattr(service, "edit_files", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("boom")))
        predictor.run(**run_inputs(fetched.image, fetched.black))
    assert events == ["trim"]


def test_the_edit_alone_runs_under_the_heap_policys_edit_settings(predictor, fetched, monkeypatch):
    """They span reading the files, the edit and the composite; not the LoRA merge, whose copies outlive the edit."""
    events = []

    @contextmanager
    def recorded():
        events.append("enter")
        yield
        events.append("exit")

    merge, edit = editor.use_loras, DifferentialDiffusionPipeline.edit
    monkeypatch.setattr(heap, "for_edit", recorded)
    monkeypatch.setattr(editor, "use_loras", lambda *args: events.append("loras") or merge(*args))
    monkeypatch.setattr(DifferentialDiffusionPipeline, "edit", lambda *args: events.append("edit") or edit(*args))
    predictor.run(**run_inputs(fetched.image, fetched.faint))
    assert events == ["loras", "enter", "edit", "exit"]


def test_gpu_out_of_memory_frees_memory_and_names_what_to_lower(predictor, fetched, monkeypatch):
    """Raised from inside the first UNet call: the failed frames' tensors are freed and the cache emptied."""
    emptied, given_to_unet = [], []

    def out_of_memory(latents, *args, **kwargs):
        given_to_unet.append(weakref.ref(latents))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with monkeypatch.context() as patch, pytest.raises(NotEnoughMemoryError) as raised:
        patch.setattr(predictor.service.pipeline.unet, "forward", out_of_memory)
        patch.setattr(torch.cuda, "is_initialized", lambda: True)
        patch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
        predictor.run(**run_inputs(fetched.image, fetched.faint, num_outputs=2))
    assert str(raised.value) == (
        f"num_outputs: out of memory making 2 output(s) of a {WIDTH}x{HEIGHT} image;"
        " lower num_outputs or send a smaller image"
    )
    assert emptied and given_to_unet and given_to_unet[0]() is None
    assert not list(predictor.output_dir.iterdir())
    assert len(predictor.run(**run_inputs(fetched.image, fetched.black))) == 1


def test_cpu_refuses_work_that_would_not_fit_before_starting(predictor, fetched, monkeypatch):
    four_outputs = memory.estimate_peak_bytes(predictor.service.pipeline, 4, WIDTH, HEIGHT)
    monkeypatch.setattr(memory, "available_bytes", lambda: four_outputs)
    with monkeypatch.context() as patch, pytest.raises(NotEnoughMemoryError) as raised:
        patch.setattr(predictor.service.pipeline, "edit", lambda request: pytest.fail("started work that cannot fit"))
        predictor.run(**run_inputs(fetched.image, fetched.faint, num_outputs=4))
    assert re.match(rf"num_outputs: 4 output\(s\) of a {WIDTH}x{HEIGHT} image need about .* GiB", str(raised.value))
    assert len(predictor.run(**run_inputs(fetched.image, fetched.black, num_outputs=1))) == 1


def sdxl_sized(dtype: torch.dtype) -> SimpleNamespace:
    """A stand-in with SDXL's VAE widths: the estimate reads nothing else from the pipeline."""
    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=[128, 256, 512, 512]))
    return SimpleNamespace(vae=vae, dtype=dtype, device=torch.device("cpu"))


def test_memory_estimate_covers_the_measured_vae_peak_and_scales_with_the_request():
    """SDXL's VAE decode peaked at about 4 full-resolution 256-channel fp32 tensors per output (measured on CPU)."""
    measured_per_output = 1024 * 1024 * 256 * 4 * 4
    one = memory.estimate_peak_bytes(sdxl_sized(torch.float32), 1, 1024, 1024)
    assert measured_per_output < one < 2 * measured_per_output
    assert memory.estimate_peak_bytes(sdxl_sized(torch.float32), 4, 1024, 1024) > 3.9 * one
    assert memory.estimate_peak_bytes(sdxl_sized(torch.bfloat16), 1, 1024, 1024) < 0.6 * one
    assert memory.estimate_peak_bytes(sdxl_sized(torch.float32), 1, 8000, 6000) > one + 8000 * 6000 * 32


def test_memory_estimate_follows_the_working_area():
    """The benchmark works below one megapixel: its estimate must shrink with the area, not assume 1 MP."""
    one_megapixel = memory.estimate_peak_bytes(sdxl_sized(torch.float32), 1, 1024, 1024)
    quarter = memory.estimate_peak_bytes(sdxl_sized(torch.float32), 1, 1024, 1024, area=512 * 512)
    assert quarter < 0.3 * one_megapixel


def test_the_memory_check_counts_the_map_it_decodes(monkeypatch):
    """A 7000x7000 map beside a 256x256 image (measured: ~1.2 GiB to decode and fit) is counted, on any device."""
    small = memory.estimate_peak_bytes(sdxl_sized(torch.float32), 1, 256, 256)
    with_map = memory.estimate_peak_bytes(sdxl_sized(torch.float32), 1, 256, 256, map_pixels=7000 * 7000)
    assert with_map - small >= 7000 * 7000 * 24
    refused = r"^num_outputs: .*send a smaller image \(or map\)$"
    monkeypatch.setattr(memory, "available_bytes", lambda: int(small / memory.MEMORY_HEADROOM) + 1)
    memory.check_fits(sdxl_sized(torch.float32), 1, 256, 256)
    with pytest.raises(NotEnoughMemoryError, match=refused):
        memory.check_fits(sdxl_sized(torch.float32), 1, 256, 256, map_pixels=7000 * 7000)
    on_gpu = SimpleNamespace(**{**vars(sdxl_sized(torch.float32)), "device": torch.device("cuda")})
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**30)  # host memory: the GPU's is checked as it is used
    memory.check_fits(on_gpu, 1, 256, 256)
    with pytest.raises(NotEnoughMemoryError, match=refused):
        memory.check_fits(on_gpu, 1, 256, 256, map_pixels=7000 * 7000)


def test_available_memory_is_capped_by_the_container_limit(tmp_path, monkeypatch):
    (tmp_path / "memory.max").write_text(f"{8 * 2**30}\n")
    (tmp_path / "memory.current").write_text(f"{6 * 2**30}\n")
    (tmp_path / "memory.stat").write_text(f"anon 123\ninactive_file {2**30}\n")
    monkeypatch.setattr(memory, "CGROUP_ROOT", tmp_path)
    assert memory.available_bytes() == 3 * 2**30

    (tmp_path / "memory.max").write_text("max\n")
    unlimited = memory.available_bytes()
    assert unlimited is not None and unlimited > 3 * 2**30  # MemAvailable alone


# --- Load ------------------------------------------------------------------------------------------------------


@pytest.mark.soak
def test_soak_memory_stays_flat_and_every_answer_is_right(server, server_tmp, tmp_path):
    """100 predictions of varied sizes, formats and batch sizes: the worker's RSS stays flat after warm-up, no
    file is left behind, and every answer has the right count, size and format (tests/soak.py)."""
    write_soak_inputs(tmp_path)
    with file_server(tmp_path) as url:
        rss, temporary_files = run_soak(server, url, server_tmp)
    warm, later = max(rss[:SOAK_WARM_UP]), max(rss[SOAK_WARM_UP:])
    assert later < warm + SOAK_RSS_MARGIN, f"RSS {warm / 2**20:.0f} MiB after warm-up, then up to {later / 2**20:.0f}"
    assert all(files == temporary_files[SOAK_WARM_UP] for files in temporary_files[SOAK_WARM_UP:]), "files left behind"
