"""Real photos and masks through edit_files on the tiny pipeline: colour profiles and EXIF kept, HEIC read, masks
grown and blurred, large pictures edited on a crop, guidance bounded."""

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.editor import edit_files
from models.inputs import EditOptions
from models.maps import shaping
from models.pictures import colour
from models.pictures.read import read_map
from models.pictures.write import numbered_paths, write_pictures
from models.sizing import working_size
from models.tooling.pictures import photo

DISPLAY_P3 = colour.rgb_profile(colour.DISPLAY_P3, colour.SRGB_CURVE, "Display P3")


def options(**changes) -> EditOptions:
    values = {"prompt": "a red boat", "negative_prompt": "", "steps": 4, "strength": 1.0, "invert_map": False,
              "guidance_scale": 0.0, "num_outputs": 1, "seed": 5}  # fmt: skip
    return EditOptions.from_values({**values, **changes})


def save(path: Path, pixels: np.ndarray, **info) -> Path:
    Image.fromarray(pixels).save(path, **info)
    return path


def right_half(width: int, height: int) -> np.ndarray:
    change_map = np.zeros((height, width), np.uint8)
    change_map[:, width // 2 :] = 255
    return change_map


def keep_columns(width: int, height: int) -> int:
    """Columns left of the half map's edge that the feathered composite leaves untouched."""
    scale = width / working_size(width, height)[0]
    return width // 2 - int(np.ceil(2 * shaping.FEATHER_PX * scale)) - 2


def test_a_wide_gamut_photo_keeps_its_pixels_and_profile_and_the_model_sees_srgb(pipeline, tmp_path, monkeypatch):
    pixels = photo(320, 240, seed=3)
    tagged = save(tmp_path / "p3.png", pixels, icc_profile=DISPLAY_P3)
    untagged = save(tmp_path / "plain.png", pixels)
    change_map = save(tmp_path / "map.png", right_half(320, 240))
    seen = []
    to_srgb = pipeline._to_srgb
    monkeypatch.setattr(pipeline, "_to_srgb", lambda image, space: seen.append(space) or to_srgb(image, space))

    result = edit_files(pipeline, tagged, change_map, options())
    [plain] = edit_files(pipeline, untagged, change_map, options()).images
    [output] = result.images
    keep = keep_columns(320, 240)
    assert np.array_equal(output[:, :keep], pixels[:, :keep])  # kept pixels: the input's, byte for byte
    assert result.metadata.icc_profile == DISPLAY_P3  # ...and they display as they did, in the input's space
    assert not seen[0].is_srgb and seen[1].is_srgb
    assert not np.array_equal(output[:, 160:], plain[:, 160:])  # generated in sRGB, brought into Display P3
    [path] = numbered_paths(tmp_path)(1, "png")
    write_pictures(result.images, [path], "png", 90, result.metadata)
    with Image.open(path) as written:
        assert written.info["icc_profile"] == DISPLAY_P3
        assert np.array_equal(np.asarray(written)[:, :keep], pixels[:, :keep])


def exif_with_location() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "Phone maker", "Phone 12", 6  # Make, Model, Orientation
    exif.get_ifd(0x8825).update({1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 36.0)})
    return exif


@pytest.mark.parametrize("keep_location", [False, True])
def test_exif_is_kept_upright_and_without_gps_unless_asked(pipeline, tmp_path, keep_location):
    stored = photo(240, 320, seed=4)  # EXIF orientation 6 turns it to 320x240 upright
    image = save(tmp_path / "phone.jpg", stored, exif=exif_with_location(), quality=95)
    change_map = save(tmp_path / "map.png", right_half(320, 240))
    result = edit_files(pipeline, image, change_map, options(keep_location=keep_location))
    [path] = numbered_paths(tmp_path)(1, "jpg")
    write_pictures(result.images, [path], "jpg", 90, result.metadata)
    with Image.open(path) as written:
        exif = written.getexif()
        assert written.size == (320, 240) and exif[0x010F] == "Phone maker" and exif.get(0x0112) == 1
        assert bool(exif.get_ifd(0x8825)) is keep_location


def test_a_heic_photo_is_edited(pipeline, tmp_path):
    pixels = photo(160, 120, seed=6)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "HEIF", quality=95)
    image = tmp_path / "photo.heic"
    image.write_bytes(buffer.getvalue())
    change_map = save(tmp_path / "map.png", right_half(160, 120))
    [output] = edit_files(pipeline, image, change_map, options()).images
    assert output.shape == (120, 160, 3)


def test_a_grown_and_blurred_mask_keeps_pixels_beyond_its_reach_exactly(pipeline, tmp_path):
    pixels = photo(512, 512, seed=8)
    mask = np.zeros((512, 512), np.uint8)
    mask[240:272, 240:272] = 255
    image, change_map = save(tmp_path / "image.png", pixels), save(tmp_path / "mask.png", mask)
    [output] = edit_files(pipeline, image, change_map, options(map_grow=20, map_blur=16, crop_to_map=False)).images
    reach = 20 + 16 + 2 + int(np.ceil(2 * shaping.FEATHER_PX * 512 / working_size(512, 512)[0])) + 2
    kept = np.ones((512, 512), bool)
    kept[240 - reach : 272 + reach, 240 - reach : 272 + reach] = False
    assert np.array_equal(output[kept], pixels[kept])
    assert not np.array_equal(output[256, 256], pixels[256, 256])
    changed = np.abs(output.astype(int) - pixels).sum(axis=2) > 0
    assert changed[256, 256 - 20 - 4] and not changed[256, 256 + 16 + reach]


@pytest.fixture(scope="module")
def large_photo(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """The issue's case: a 500x500 edit in a 4000x3000 photo."""
    folder = tmp_path_factory.mktemp("large")
    pixels = photo(4000, 3000, seed=9)
    change_map = np.zeros((3000, 4000), np.uint8)
    change_map[1250:1750, 1750:2250] = 255
    return save(folder / "photo.png", pixels), save(folder / "map.png", change_map), pixels


def recorded_requests(pipeline, monkeypatch) -> list:
    requests, edit = [], pipeline.edit
    monkeypatch.setattr(pipeline, "edit", lambda request, *args: requests.append(request) or edit(request, *args))
    return requests


def test_a_small_edit_in_a_large_photo_is_made_on_a_crop_at_higher_resolution(
    pipeline, large_photo, monkeypatch, caplog
):
    image, change_map, pixels = large_photo
    requests = recorded_requests(pipeline, monkeypatch)
    with caplog.at_level(logging.INFO, logger="models.editor"):
        result = edit_files(pipeline, image, change_map, options())
    [output] = result.images
    assert output.shape == pixels.shape
    [request] = requests
    assert request.image.shape == (1000, 1000, 3) and request.working_area == 1024 * 1024  # 250 px of context
    crop_width = working_size(1000, 1000, request.working_area)[0]
    whole_width = working_size(4000, 3000)[0]
    assert crop_width / 1000 > 3 * whole_width / 4000  # ~1 working pixel per pixel a side, against 0.29
    assert "crop: editing 1000x1000 at (1500, 1000) of 4000x3000" in caplog.text
    outside = np.ones((3000, 4000), bool)
    outside[1000:2000, 1500:2500] = False
    assert np.array_equal(output[outside], pixels[outside])  # byte-exact outside the crop
    band = shaping.FEATHER_PX * 2 + 2  # inside the crop the working size is about the picture's: the band stays narrow
    assert np.array_equal(output[1250 - band - 2, 1500:2500], pixels[1250 - band - 2, 1500:2500])
    assert result.crop_images[0].shape == (1000, 1000, 3)
    assert np.array_equal(output[1000:2000, 1500:2500], result.crop_images[0])


def test_crop_to_map_off_edits_the_whole_picture(pipeline, large_photo, monkeypatch):
    image, change_map, pixels = large_photo
    requests = recorded_requests(pipeline, monkeypatch)
    [output] = edit_files(pipeline, image, change_map, options(crop_to_map=False)).images
    assert requests[0].image.shape == pixels.shape and output.shape == pixels.shape


def test_guidance_above_the_warning_level_is_logged(pipeline, tmp_path, caplog):
    image = save(tmp_path / "image.png", photo(64, 48))
    change_map = save(tmp_path / "map.png", right_half(64, 48))
    with caplog.at_level(logging.WARNING):
        edit_files(pipeline, image, change_map, options(guidance_scale=2.5, steps=1))
    assert "guidance_scale 2.5: Flash-SDXL is trained without guidance" in caplog.text


def test_the_map_reaches_the_pipeline_prepared_in_order(pipeline, tmp_path, monkeypatch):
    """Invert, grow, blur, then strength: what the pipeline gets is shaping.prepare of the map as read, inverted."""
    image = save(tmp_path / "image.png", photo(256, 256))
    mask = np.full((256, 256), 255, np.uint8)
    mask[100:140, 100:140] = 0  # white = keep: the black square is what changes
    change_map = save(tmp_path / "mask.png", mask)
    requests = recorded_requests(pipeline, monkeypatch)
    edit_files(pipeline, image, change_map, options(invert_map=True, map_grow=6, map_blur=4, strength=0.5, steps=1))
    expected = shaping.prepare(1.0 - torch.from_numpy(read_map(change_map)), grow=6, blur=4, strength=0.5)
    assert np.array_equal(requests[0].change_map, expected.numpy())


def test_steps_outside_the_accelerator_s_own_counts_are_warned(pipeline, tmp_path, caplog):
    image = save(tmp_path / "image.png", photo(64, 48))
    change_map = save(tmp_path / "map.png", right_half(64, 48))
    with caplog.at_level(logging.WARNING):
        edit_files(pipeline, image, change_map, options(steps=2))
    assert "steps 2: Flash-SDXL is made for 4 steps" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        edit_files(pipeline, image, change_map, options(steps=4))
    assert "is made for" not in caplog.text
