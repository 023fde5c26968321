"""Reading any picture safely and encoding results."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models import imageio
from models.errors import InputError
from models.limits import MAX_INPUT_PIXELS


def save(tmp_path: Path, picture: Image.Image, name: str, **options) -> Path:
    path = tmp_path / name
    picture.save(path, **options)
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A few-byte PNG that claims a huge size: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_rgb_round_trip(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(imageio.read_image(save(tmp_path, Image.fromarray(pixels), "a.png")), pixels)


def test_exif_orientation_is_honoured(tmp_path):
    picture = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image = imageio.read_image(save(tmp_path, picture, "rotated.jpg", exif=exif))
    assert image.shape == (40, 20, 3)


def test_alpha_is_flattened_onto_white(tmp_path):
    picture = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert (imageio.read_image(save(tmp_path, picture, "clear.png")) == 255).all()


@pytest.mark.parametrize(
    ("mode", "color", "name"),
    [("CMYK", (0, 255, 255, 0), "cmyk.jpg"), ("P", 3, "palette.png"), ("L", 128, "gray.png"), ("1", 1, "bw.png")],
)
def test_other_modes_become_rgb(tmp_path, mode, color, name):
    image = imageio.read_image(save(tmp_path, Image.new(mode, (8, 6), color), name))
    assert image.shape == (6, 8, 3) and image.dtype == np.uint8


def test_sixteen_bit_pictures_are_scaled_not_clipped(tmp_path):
    picture = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    path = save(tmp_path, picture, "deep.png")
    assert (imageio.read_image(path) == 255).all()
    assert np.allclose(imageio.read_map(path), 1.0)


def test_animated_files_use_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), color) for color in ("white", "black")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert (imageio.read_image(path) == 255).all()


def test_colour_map_uses_luminance_and_alpha(tmp_path):
    assert np.allclose(imageio.read_map(save(tmp_path, Image.new("RGB", (4, 4), "white"), "w.png")), 1.0)
    red = imageio.read_map(save(tmp_path, Image.new("RGB", (4, 4), (255, 0, 0)), "r.png"))
    assert np.allclose(red, 0.299, atol=0.01)
    transparent_white = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    assert (imageio.read_map(save(tmp_path, transparent_white, "tw.png")) == 0).all()


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(40000, 40000))
    assert path.stat().st_size < 200
    with pytest.raises(InputError, match=rf"^image: .*{MAX_INPUT_PIXELS:,}"):
        imageio.read_image(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"hello, not a picture", "not a readable picture"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not a readable"),
    ],
)
def test_non_pictures_are_refused(tmp_path, content, message):
    path = tmp_path / "file"
    path.write_bytes(content)
    with pytest.raises(InputError, match=rf"^map: .*{message}"):
        imageio.read_map(path, "map")


def test_truncated_file_is_refused(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(InputError, match=r"^image: .*truncated"):
        imageio.read_image(path)


def test_missing_file_input_is_named():
    with pytest.raises(InputError, match=r"^image: required"):
        imageio.read_image(None)


@pytest.mark.parametrize("fmt", imageio.OUTPUT_FORMATS)
def test_outputs_decode_to_the_right_size(tmp_path, fmt):
    pixels = np.zeros((30, 40, 3), np.uint8)
    [path] = imageio.write_outputs([pixels], tmp_path, fmt, 80)
    assert path.suffix == f".{fmt}" and Image.open(path).size == (40, 30)


def test_png_output_is_lossless():
    pixels = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(imageio.encode_image(pixels, "png", 1)))), pixels)
