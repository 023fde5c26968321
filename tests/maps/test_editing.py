"""Maps nobody painted, through the edit on the tiny pipeline: a JPEG map's near-black, transparency as the map,
outpainting, and the map the edit used."""

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.editor import edit_files
from models.inputs import EditOptions
from models.maps.outpaint import Extension
from models.tooling.pictures import photo
from tests.support.editing import VALID


def options(**changes) -> EditOptions:
    return EditOptions.from_values({**VALID, "steps": 2, **changes})


def save(path: Path, pixels: np.ndarray, **info) -> Path:
    Image.fromarray(pixels).save(path, **info)
    return path


def test_a_jpeg_map_s_near_black_is_kept_exactly_and_the_crop_still_pays(pipeline, tmp_path, caplog):
    """The issue's case, smaller: a white square on black saved as JPEG rings into 1-3 of 255 around it and dithers
    elsewhere; every pixel the square's feathered edit cannot reach still comes back byte for byte."""
    width, height = 1800, 1200
    pixels = photo(width, height, seed=4)
    square = np.zeros((height, width), np.uint8)
    square[500:620, 800:920] = 255
    noisy = np.clip(square.astype(np.int16) + np.random.default_rng(0).integers(0, 3, square.shape), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(noisy.astype(np.uint8)).save(buffer, "JPEG", quality=70)
    map_path = tmp_path / "map.jpg"
    map_path.write_bytes(buffer.getvalue())
    decoded = np.asarray(Image.open(map_path).convert("L"))
    assert 0 < int(decoded[:300].max()) <= 2 and decoded[:300].mean() > 0.3  # the trap: no pixel far off is black
    with caplog.at_level(logging.INFO):
        result = edit_files(pipeline, save(tmp_path / "photo.png", pixels), map_path, options())
    assert "crop: editing" in caplog.text
    far = np.ones((height, width), bool)
    far[400:720, 700:1020] = False
    assert np.array_equal(result.images[0][far], pixels[far])
    assert float(result.change_map[far].max()) == 0.0


def test_a_transparent_area_is_regenerated_and_the_opaque_rest_kept_exactly(pipeline, tmp_path):
    pixels = photo(96, 64, seed=6)
    alpha = np.full((64, 96), 255, np.uint8)
    alpha[:, 64:] = 0
    image = save(tmp_path / "cutout.png", np.dstack([pixels, alpha]))
    result = edit_files(pipeline, image, None, options())
    output = result.images[0]
    assert output.shape == (64, 96, 3)
    assert np.array_equal(output[:, :40], pixels[:, :40])
    assert not np.array_equal(output[:, 70:], pixels[:, 70:])


def test_outpainting_grows_the_canvas_and_keeps_the_picture_beyond_the_seam(pipeline, tmp_path):
    pixels = photo(80, 60, seed=8)
    image = save(tmp_path / "photo.png", pixels)
    result = edit_files(pipeline, image, None, options(extend_left=24, extend_bottom=16))
    output = result.images[0]
    assert output.shape == (76, 104, 3) and result.change_map.shape == (76, 104)
    seam = Extension(24, 0, 0, 16, 80, 60).seam
    kept = (slice(0, 60 - seam - 6), slice(24 + seam + 6, 104))  # beyond the seam and its feathered band
    assert np.array_equal(output[kept], pixels[kept[0], kept[1].start - 24 :])
    assert np.all(result.change_map[:, :24].numpy() == 1) and np.all(result.change_map[60:].numpy() == 1)


def test_outpainting_writes_the_canvas_size_into_the_outputs_exif(pipeline, tmp_path):
    exif = Image.Exif()
    exif[0x8769] = {0xA002: 80, 0xA003: 60}  # ExifImageWidth, ExifImageHeight in the EXIF sub-IFD
    image = save(tmp_path / "photo.jpg", photo(80, 60, seed=8), exif=exif.tobytes())
    result = edit_files(pipeline, image, None, options(extend_right=20, steps=1))
    written = Image.Exif()
    written.load(result.metadata.exif)
    assert written.get_ifd(0x8769)[0xA002] == 100


@pytest.mark.parametrize("changes", [{"map_grow": 3}, {"map_blur": 5}, {"strength": 0.5}])
def test_grow_blur_and_strength_act_on_the_transparency_map_too(pipeline, tmp_path, changes):
    alpha = np.full((64, 96), 255, np.uint8)
    alpha[20:40, 30:60] = 0
    image = save(tmp_path / "cutout.png", np.dstack([photo(96, 64, seed=1), alpha]))
    plain = edit_files(pipeline, image, None, options(steps=1)).change_map
    shaped = edit_files(pipeline, image, None, options(steps=1, **changes)).change_map
    assert not np.array_equal(plain.numpy(), shaped.numpy())
