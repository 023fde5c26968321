"""Reading any picture safely, and encoding results with the input's metadata."""

import io
import logging
import struct
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from PIL import AvifImagePlugin, ExifTags, Image
from pillow_heif.as_plugin import HeifImageFile

from models.errors import InputError
from models.limits import MAX_INPUT_BYTES, MAX_INPUT_PIXELS
from models.pictures import colour
from models.pictures.metadata import OutputMetadata
from models.pictures.read import picture_size, read_image, read_map, read_picture
from models.pictures.write import OUTPUT_FORMATS, encode_image, numbered_paths, write_pictures
from tests.support.editing import png_header_only


def save(tmp_path: Path, picture: Image.Image, name: str, **options) -> Path:
    path = tmp_path / name
    picture.save(path, **options)
    return path


def test_rgb_round_trip(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(read_image(save(tmp_path, Image.fromarray(pixels), "a.png")), pixels)


def test_exif_orientation_is_honoured(tmp_path):
    picture = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image = read_image(save(tmp_path, picture, "rotated.jpg", exif=exif))
    assert image.shape == (40, 20, 3)


def test_alpha_is_flattened_onto_white(tmp_path):
    picture = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert (read_image(save(tmp_path, picture, "clear.png")) == 255).all()


@pytest.mark.parametrize(
    ("mode", "color", "name"),
    [("CMYK", (0, 255, 255, 0), "cmyk.jpg"), ("P", 3, "palette.png"), ("L", 128, "gray.png"), ("1", 1, "bw.png")],
)
def test_other_modes_become_rgb(tmp_path, mode, color, name):
    image = read_image(save(tmp_path, Image.new(mode, (8, 6), color), name))
    assert image.shape == (6, 8, 3) and image.dtype == np.uint8


def test_sixteen_bit_pictures_are_scaled_not_clipped(tmp_path):
    picture = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    path = save(tmp_path, picture, "deep.png")
    assert (read_image(path) == 255).all()
    assert np.allclose(read_map(path), 1.0)


def test_animated_files_use_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), color) for color in ("white", "black")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert (read_image(path) == 255).all()


def test_colour_map_uses_luminance_and_alpha(tmp_path):
    assert np.allclose(read_map(save(tmp_path, Image.new("RGB", (4, 4), "white"), "w.png")), 1.0)
    red = read_map(save(tmp_path, Image.new("RGB", (4, 4), (255, 0, 0)), "r.png"))
    assert np.allclose(red, 0.299, atol=0.01)
    transparent_white = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    assert (read_map(save(tmp_path, transparent_white, "tw.png")) == 0).all()


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(40000, 40000))
    assert path.stat().st_size < 200
    with pytest.raises(InputError, match=rf"^image: .*{MAX_INPUT_PIXELS:,}"):
        read_image(path)


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
        read_map(path, "map")


def test_truncated_file_is_refused(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(InputError, match=r"^image: .*truncated"):
        read_image(path)


def test_missing_file_input_is_named():
    with pytest.raises(InputError, match=r"^image: required"):
        read_image(None)


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_outputs_decode_to_the_right_size(tmp_path, fmt):
    pixels = np.zeros((30, 40, 3), np.uint8)
    [path] = numbered_paths(tmp_path)(1, fmt)
    write_pictures([pixels], [path], fmt, 80, None)
    with Image.open(path) as output:
        assert path.suffix == f".{fmt}" and output.size == (40, 30)


def test_png_output_is_lossless():
    pixels = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_image(pixels, "png", 1)))), pixels)


# --- Metadata carried into outputs ------------------------------------------------------------------------------

XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:exif="http://ns.adobe.com/exif/1.0/" xmlns:tiff="http://ns.adobe.com/tiff/1.0/"'
    b' exif:GPSLatitude="48,51.5N" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)


def camera_exif() -> bytes:
    """A phone's EXIF: camera, date, exposure, a maker note, GPS and a thumbnail (IFD1) of the unedited picture."""
    exif = Image.Exif()
    exif[ExifTags.Base.Make], exif[ExifTags.Base.Model] = "Phone Co", "Phone 1"
    exif[ExifTags.Base.DateTime] = "2024:05:06 07:08:09"
    exif[ExifTags.Base.Orientation] = 6  # turned: stored 40x20, shown 20x40
    exif[ExifTags.IFD.Exif] = {
        ExifTags.Base.ExposureTime: 0.01,
        ExifTags.Base.ExifImageWidth: 40,
        ExifTags.Base.ExifImageHeight: 20,
        ExifTags.Base.MakerNote: b"vendor data with offsets",
    }
    exif[ExifTags.IFD.GPSInfo] = {ExifTags.GPS.GPSLatitudeRef: "N", ExifTags.GPS.GPSLatitude: (48.0, 51.0, 30.0)}
    return with_thumbnail(exif.tobytes())


def with_thumbnail(exif: bytes) -> bytes:
    """EXIF bytes with an IFD1 thumbnail appended after the main directory (Pillow writes none)."""
    tiff = exif[6:]
    order = "<" if tiff[:2] == b"II" else ">"
    (main,) = struct.unpack_from(f"{order}I", tiff, 4)
    (entries,) = struct.unpack_from(f"{order}H", tiff, main)
    next_pointer = main + 2 + 12 * entries
    thumbnail = io.BytesIO()
    Image.new("RGB", (8, 4), "blue").save(thumbnail, "JPEG")
    ifd1 = len(tiff)
    directory = struct.pack(f"{order}H", 2)
    directory += struct.pack(f"{order}HHII", 0x0201, 4, 1, ifd1 + 2 + 24 + 4)
    directory += struct.pack(f"{order}HHII", 0x0202, 4, 1, len(thumbnail.getvalue())) + bytes(4)
    tiff = tiff[:next_pointer] + struct.pack(f"{order}I", ifd1) + tiff[next_pointer + 4 :] + directory
    return b"Exif\0\0" + tiff + thumbnail.getvalue()


def exif_of(encoded: bytes) -> Image.Exif:
    with Image.open(io.BytesIO(encoded)) as picture:
        return picture.getexif()


def test_camera_exif_is_kept_upright_without_location_or_thumbnail(tmp_path):
    path = save(tmp_path, Image.new("RGB", (40, 20), "red"), "phone.jpg", exif=camera_exif())
    with Image.open(path) as original:
        assert original.getexif().get_ifd(ExifTags.IFD.IFD1)  # the input has a thumbnail
    picture = read_picture(path)
    assert picture.pixels.shape == (40, 20, 3)
    for output_format in OUTPUT_FORMATS:
        exif = exif_of(encode_image(picture.pixels, output_format, 90, picture.metadata))
        assert exif[ExifTags.Base.Make] == "Phone Co" and exif[ExifTags.Base.Model] == "Phone 1", output_format
        assert exif[ExifTags.Base.DateTime] == "2024:05:06 07:08:09" and exif[ExifTags.Base.Orientation] == 1
        shot = exif.get_ifd(ExifTags.IFD.Exif)
        assert shot[ExifTags.Base.ExposureTime] == 0.01 and ExifTags.Base.MakerNote not in shot
        assert (shot[ExifTags.Base.ExifImageWidth], shot[ExifTags.Base.ExifImageHeight]) == (20, 40)
        assert not exif.get_ifd(ExifTags.IFD.GPSInfo) and ExifTags.IFD.GPSInfo not in exif
        assert not exif.get_ifd(ExifTags.IFD.IFD1)


def test_keep_location_keeps_gps(tmp_path):
    path = save(tmp_path, Image.new("RGB", (40, 20), "red"), "phone.jpg", exif=camera_exif())
    picture = read_picture(path, keep_location=True)
    exif = exif_of(encode_image(picture.pixels, "jpg", 90, picture.metadata))
    assert exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitude] == (48.0, 51.0, 30.0)


def test_a_tiffs_storage_tags_stay_out_of_the_outputs_exif(tmp_path):
    exif = Image.Exif()
    exif[ExifTags.Base.Artist] = "Someone"
    path = save(tmp_path, Image.new("RGB", (8, 8), "red"), "scan.tif", exif=exif)
    kept = Image.Exif()
    kept.load(read_picture(path).metadata.exif)
    assert kept[ExifTags.Base.Artist] == "Someone"
    assert ExifTags.Base.StripOffsets not in kept and ExifTags.Base.ImageWidth not in kept


def test_pictures_without_exif_give_outputs_without_exif(tmp_path):
    picture = read_picture(save(tmp_path, Image.new("RGB", (8, 8)), "plain.png"))
    assert picture.metadata == OutputMetadata()
    with Image.open(io.BytesIO(encode_image(picture.pixels, "webp", 90, picture.metadata))) as output:
        assert "exif" not in output.info and "icc_profile" not in output.info


def test_xmp_is_dropped_unless_location_is_kept(tmp_path):
    path = save(tmp_path, Image.new("RGB", (40, 20), "red"), "phone.jpg", exif=camera_exif(), xmp=XMP)
    assert read_picture(path).metadata.xmp is None
    picture = read_picture(path, keep_location=True)
    assert b"exif:GPSLatitude" in picture.metadata.xmp and b"tiff:Orientation" not in picture.metadata.xmp
    for output_format in OUTPUT_FORMATS:
        with Image.open(io.BytesIO(encode_image(picture.pixels, output_format, 90, picture.metadata))) as out:
            assert out.info["xmp"] == picture.metadata.xmp, output_format


def test_exif_too_large_for_a_jpeg_is_left_out(caplog):
    exif = Image.Exif()
    exif[ExifTags.Base.ImageDescription] = "x" * 70000
    metadata = OutputMetadata(exif=exif.tobytes())
    with caplog.at_level(logging.WARNING):
        encoded = encode_image(np.zeros((4, 4, 3), np.uint8), "jpg", 90, metadata)
    assert "does not fit in a JPEG" in caplog.text and not exif_of(encoded)
    assert exif_of(encode_image(np.zeros((4, 4, 3), np.uint8), "webp", 90, metadata))


# --- HEIC and AVIF ----------------------------------------------------------------------------------------------


def smooth(width: int = 64, height: int = 48) -> np.ndarray:
    """A picture lossy codecs keep closely: gradients only."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=2).astype(np.uint8)


HEIF_OPTIONS = {"heic": {"quality": -1, "chroma": 444}, "avif": {"quality": 100, "subsampling": "4:4:4"}}


@pytest.mark.parametrize("suffix", HEIF_OPTIONS)
def test_heic_and_avif_are_read(tmp_path, suffix):
    pixels = smooth()
    path = save(tmp_path, Image.fromarray(pixels), f"phone.{suffix}", **HEIF_OPTIONS[suffix])
    image = read_image(path)
    assert image.shape == pixels.shape and image.dtype == np.uint8
    assert np.abs(image.astype(int) - pixels).max() <= 4
    assert picture_size(path) == (64, 48)
    assert np.abs(read_map(path) - np.asarray(Image.fromarray(pixels).convert("L")) / 255).max() < 0.02


@pytest.mark.parametrize("suffix", HEIF_OPTIONS)
def test_heic_and_avif_orientation_agrees_with_the_header_size(tmp_path, suffix):
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    path = save(tmp_path, Image.fromarray(smooth()), f"turned.{suffix}", exif=exif, **HEIF_OPTIONS[suffix])
    height, width = read_image(path).shape[:2]
    assert picture_size(path) == (width, height)


def test_sixteen_bit_heic_decodes_to_eight_bits(tmp_path):
    deep = np.random.default_rng(0).integers(0, 1024, (16, 24, 3)).astype(np.uint16) * 64
    path = tmp_path / "deep.heic"
    pillow_heif.from_bytes(mode="RGB;16", size=(24, 16), data=deep.tobytes()).save(path, quality=-1, chroma=444)
    image = read_image(path)
    assert image.dtype == np.uint8 and np.abs(image.astype(int) - (deep >> 8)).max() <= 1


def test_nclx_display_p3_heic_reads_as_display_p3(tmp_path):
    pixels = smooth()
    path = save(
        tmp_path, Image.fromarray(pixels), "p3.heic", color_primaries=12, transfer_characteristic=13, quality=-1
    )
    picture = read_picture(path)
    display_p3 = colour.ColourSpace.from_icc(colour.rgb_profile(colour.DISPLAY_P3, colour.SRGB_CURVE, "P3"))
    assert not picture.colour_space.is_srgb and picture.metadata.icc_profile == picture.colour_space.icc_profile
    assert np.array_equal(picture.colour_space.to_srgb(pixels), display_p3.to_srgb(pixels))


def test_nclx_srgb_heic_reads_as_srgb(tmp_path):
    path = save(tmp_path, Image.fromarray(smooth()), "srgb.heic", color_primaries=1, transfer_characteristic=13)
    assert read_picture(path).colour_space is colour.UNTAGGED


def avif_with_primaries(tmp_path: Path, primaries: int) -> Path:
    """An AVIF whose nclx box says the given primaries (Pillow's encoder writes sRGB's: patched)."""
    encoded = io.BytesIO()
    Image.fromarray(smooth()).save(encoded, "AVIF", **HEIF_OPTIONS["avif"])
    data = bytearray(encoded.getvalue())
    assert data.count(b"colrnclx") == 1
    struct.pack_into(">H", data, data.find(b"colrnclx") + 8, primaries)
    path = tmp_path / f"primaries-{primaries}.avif"
    path.write_bytes(data)
    return path


def test_nclx_of_an_avif_is_honoured(tmp_path):
    assert read_picture(avif_with_primaries(tmp_path, 1)).colour_space is colour.UNTAGGED
    picture = read_picture(avif_with_primaries(tmp_path, 9))
    bt2020 = colour.ColourSpace.from_icc(colour.rgb_profile(colour.BT2020, colour.SRGB_CURVE, "BT.2020"))
    assert np.array_equal(picture.colour_space.to_srgb(smooth()), bt2020.to_srgb(smooth()))


@pytest.mark.parametrize("suffix", HEIF_OPTIONS)
def test_icc_profile_of_heic_and_avif_is_kept(tmp_path, suffix):
    profile = colour.rgb_profile(colour.DISPLAY_P3, colour.SRGB_CURVE, "Display P3")
    path = save(tmp_path, Image.fromarray(smooth()), f"icc.{suffix}", icc_profile=profile, **HEIF_OPTIONS[suffix])
    assert read_picture(path).metadata.icc_profile == profile


def with_header_size(path: Path, width: int, height: int) -> Path:
    """The same file with its ispe box (the size in the header) claiming another size."""
    data = bytearray(path.read_bytes())
    assert data.count(b"ispe") == 1
    struct.pack_into(">II", data, data.find(b"ispe") + 8, width, height)
    patched = path.with_name(f"claims-{width}x{height}{path.suffix}")
    patched.write_bytes(data)
    return patched


@pytest.mark.parametrize("suffix", HEIF_OPTIONS)
@pytest.mark.parametrize(("width", "height"), [(10000, 6000), (12000, 12000)], ids=["over-the-limit", "bomb"])
def test_heic_and_avif_pixel_limit_is_checked_from_the_header(tmp_path, monkeypatch, suffix, width, height):
    """The HEIC here is 64x48 cropped (clap) from 64x64: its decoder reports the crop, the check reads ispe too."""
    path = with_header_size(
        save(tmp_path, Image.fromarray(smooth()), f"small.{suffix}", **HEIF_OPTIONS[suffix]), width, height
    )
    for plugin in (HeifImageFile, AvifImagePlugin.AvifImageFile):
        monkeypatch.setattr(plugin, "load", lambda self: pytest.fail("decoded before the size was checked"))
    for read in (read_image, picture_size, read_map):
        with pytest.raises(
            InputError, match=rf"^image: ({width}x{height} is )?larger than {MAX_INPUT_PIXELS:,} pixels"
        ):
            read(path, "image")


def test_oversized_heic_file_is_refused(tmp_path):
    path = save(tmp_path, Image.fromarray(smooth()), "huge.heic")
    with open(path, "r+b") as sparse:
        sparse.truncate(MAX_INPUT_BYTES + 1)
    with pytest.raises(InputError, match=rf"^image: .* at most {MAX_INPUT_BYTES // 2**20} MiB"):
        read_image(path)


def test_refusals_name_heic_and_avif(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"not a picture")
    with pytest.raises(InputError, match=r"allowed: PNG, JPEG, WebP, GIF, BMP, TIFF, HEIC, AVIF$"):
        read_image(path)
    with pytest.raises(InputError, match=r"^image: required; .*HEIC, AVIF"):
        read_picture(None)
