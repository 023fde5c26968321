"""Colour management: built ICC profiles, the transforms to and from sRGB, and colour-managed reading and writing."""

import io
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from models.pictures import colour
from models.pictures.colour import ColourSpace, Primaries, Transfer
from models.pictures.read import read_picture
from models.pictures.write import OUTPUT_FORMATS, encode_image
from models.tooling.pictures import photo

DISPLAY_P3 = colour.rgb_profile(colour.DISPLAY_P3, colour.SRGB_CURVE, "Display P3")
ADOBE_RGB = colour.rgb_profile(
    Primaries("Adobe RGB (1998)", red=(0.64, 0.33), green=(0.21, 0.71), blue=(0.15, 0.06), white=colour.D65),
    Transfer("gamma 563/256", gamma=563 / 256),
    "Adobe RGB (1998)",
)
SRGB = ImageCms.createProfile("sRGB")
"""lcms2's own sRGB, the module's target: its serialised bytes (below) differ from it by one level at most."""
LCMS_SRGB = ImageCms.ImageCmsProfile(SRGB).tobytes()
WIDE_GAMUT = {"display-p3": DISPLAY_P3, "adobe-rgb": ADOBE_RGB}


def srgb_to(profile: bytes, pixels: np.ndarray) -> np.ndarray:
    """ImageCms's own conversion of sRGB pixels into a profile's space: what the module must agree with."""
    return convert(pixels, SRGB, profile)


def convert(pixels: np.ndarray, source: bytes | ImageCms.core.CmsProfile, target: bytes | ImageCms.core.CmsProfile):
    """ImageCms's conversion between two profiles, relative colorimetric."""
    source, target = (io.BytesIO(p) if isinstance(p, bytes) else p for p in (source, target))
    return np.asarray(
        ImageCms.profileToProfile(
            Image.fromarray(pixels), source, target, renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC
        )
    )


PAPER, INK = 0.96, 0.06
"""Reflectance of the test printer's paper and of its darkest ink: its black is a dark grey, as on paper."""


def lab_8(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 (N, 3) as ICC v2 8-bit Lab (L * 2.55, a + 128, b + 128), as lut8 tables store it."""
    lab = ImageCms.applyTransform(Image.fromarray(rgb.reshape(1, -1, 3)), srgb_lab_transform("RGB", "LAB"))
    # Pillow keeps a and b as signed bytes in memory; ICC's 8-bit encoding offsets them by 128.
    return np.frombuffer(lab.tobytes(), np.uint8).reshape(-1, 3) ^ np.array([0, 128, 128], np.uint8)


def srgb_from_lab_8(lab: np.ndarray) -> np.ndarray:
    signed = Image.frombytes("LAB", (len(lab), 1), (lab ^ np.array([0, 128, 128], np.uint8)).tobytes())
    return np.asarray(ImageCms.applyTransform(signed, srgb_lab_transform("LAB", "RGB"))).reshape(-1, 3)


def srgb_lab_transform(in_mode: str, out_mode: str) -> ImageCms.ImageCmsTransform:
    profiles = (SRGB, ImageCms.createProfile("LAB"))
    return ImageCms.buildTransform(*(profiles if in_mode == "RGB" else profiles[::-1]), in_mode, out_mode)


def lut8(inputs: int, outputs: int, grid: int, table: np.ndarray) -> bytes:
    """An ICC lut8 tag: identity curves around a grid of grid ** inputs entries, the first input varying slowest."""
    identity = bytes(range(256))
    matrix = struct.pack(">9i", 65536, 0, 0, 0, 65536, 0, 0, 0, 65536)
    header = b"mft1" + bytes(4) + bytes([inputs, outputs, grid, 0]) + matrix
    return header + identity * inputs + table.astype(np.uint8).tobytes() + identity * outputs


def cmyk_profile(grid: int = 5) -> bytes:
    """A small CMYK printer profile (lut8 tables to and from Lab) of a simple subtractive printer."""
    levels = np.linspace(0.0, 1.0, grid)
    inks = np.stack(np.meshgrid(levels, levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 4)
    reflectance = (1 - inks[:, :3]) * (1 - inks[:, 3:]) * (PAPER - INK) + INK
    to_lab = lut8(4, 3, grid, lab_8(np.round(reflectance * 255).astype(np.uint8)))
    lab_grid = np.stack(np.meshgrid(*[np.round(np.linspace(0, 255, 9))] * 3, indexing="ij"), -1).reshape(-1, 3)
    colours = np.clip((srgb_from_lab_8(lab_grid.astype(np.uint8)) / 255 - INK) / (PAPER - INK), 0, 1)
    black = 1 - colours.max(axis=1, keepdims=True)
    cmy = 1 - colours / np.maximum(1 - black, 1e-6)
    from_lab = lut8(3, 4, 9, np.round(np.concatenate([cmy, black], axis=1) * 255))
    tags = [(b"desc", description("Test CMYK")), (b"A2B0", to_lab), (b"B2A0", from_lab)]
    return colour.assemble_profile(b"prtr", b"CMYK", b"Lab ", tags)


def gray_profile(gamma: float) -> bytes:
    """A gray display profile with a pure gamma curve."""
    white = b"XYZ " + bytes(4) + struct.pack(">3i", *(round(v * 65536) for v in colour.D50))
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256))
    tags = [(b"desc", description("Test gray")), (b"wtpt", white), (b"kTRC", curve)]
    return colour.assemble_profile(b"mntr", b"GRAY", b"XYZ ", tags)


def description(text: str) -> bytes:
    ascii_text = text.encode() + b"\0"
    return b"desc" + bytes(4) + struct.pack(">I", len(ascii_text)) + ascii_text + bytes(78)


def save(tmp_path: Path, picture: Image.Image, name: str, **options) -> Path:
    path = tmp_path / name
    picture.save(path, **options)
    return path


def in_gamut_colours(profile: bytes, seed: int = 0) -> np.ndarray:
    """Colours of a wide-gamut space that sRGB can show: random sRGB colours converted into it."""
    return srgb_to(profile, np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


# --- Built profiles ---------------------------------------------------------------------------------------------


def test_built_display_p3_matches_apples_profile_and_published_conversions():
    profile = ImageCms.ImageCmsProfile(io.BytesIO(DISPLAY_P3)).profile
    assert profile.xcolor_space == "RGB " and profile.is_matrix_shaper and profile.profile_description == "Display P3"
    # Apple's Display P3 profile: rXYZ, gXYZ, bXYZ, adapted to D50.
    expected = [(0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841)]
    colorants = [profile.red_colorant[0], profile.green_colorant[0], profile.blue_colorant[0]]
    assert np.allclose(colorants, expected, atol=2e-4)
    srgb = np.array([[[255, 0, 0], [0, 255, 0], [128, 128, 128], [255, 255, 255], [0, 0, 0]]], np.uint8)
    in_p3 = ColourSpace.from_icc(DISPLAY_P3).from_srgb(srgb)
    # sRGB red and green in Display P3: (0.9175, 0.2003, 0.1387) and (0.4584, 0.9853, 0.2983).
    assert np.abs(in_p3[0, :2].astype(int) - [[234, 51, 35], [117, 251, 76]]).max() <= 1
    assert np.array_equal(in_p3[0, 2:], srgb[0, 2:])  # the same white and curve: greys stay greys


def test_built_srgb_profiles_are_recognised_as_srgb():
    assert ColourSpace.from_icc(colour.SRGB_PROFILE).is_srgb
    assert ColourSpace.from_icc(LCMS_SRGB).is_srgb
    assert not ColourSpace.from_icc(DISPLAY_P3).is_srgb and not ColourSpace.from_icc(ADOBE_RGB).is_srgb
    grid = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.abs(convert(grid, colour.SRGB_PROFILE, SRGB).astype(int) - grid).max() <= 1


def test_built_profiles_are_deterministic_and_v2():
    assert colour.rgb_profile(colour.BT2020, colour.BT709_CURVE, "x") == colour.rgb_profile(
        colour.BT2020, colour.BT709_CURVE, "x"
    )
    assert ImageCms.ImageCmsProfile(io.BytesIO(ADOBE_RGB)).profile.version == 2.1


@pytest.mark.parametrize(
    ("primaries", "transfer", "expected"),
    [
        (12, 13, DISPLAY_P3),
        (9, 1, colour.rgb_profile(colour.BT2020, colour.BT709_CURVE, "")),
        (1, 8, colour.rgb_profile(colour.BT709, colour.LINEAR, "")),
        (11, 4, colour.rgb_profile(colour.DCI_P3, colour.GAMMA_22, "")),
    ],
)
def test_nclx_becomes_an_equivalent_profile(primaries, transfer, expected):
    built = colour.nclx_profile(primaries, transfer, "image")
    grid = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(ColourSpace.from_icc(built).to_srgb(grid), ColourSpace.from_icc(expected).to_srgb(grid))


@pytest.mark.parametrize(("primaries", "transfer"), [(1, 13), (2, 2), (1, 2), (2, 13)])
def test_nclx_srgb_means_no_profile(primaries, transfer):
    assert colour.nclx_profile(primaries, transfer, "image") is None


def test_hdr_and_unknown_nclx_are_read_as_sdr_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        pq = colour.nclx_profile(9, 16, "image")
        unknown = colour.nclx_profile(22, 13, "image")
    assert "image: HDR (PQ)" in caplog.text and "image: colour primaries 22" in caplog.text
    grid = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    bt2020 = colour.nclx_profile(9, 13, "image")
    assert np.array_equal(ColourSpace.from_icc(pq).to_srgb(grid), ColourSpace.from_icc(bt2020).to_srgb(grid))
    assert unknown is None


# --- Transforms -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", WIDE_GAMUT.values(), ids=WIDE_GAMUT.keys())
def test_to_srgb_is_imagecms_conversion(profile):
    pixels = photo(48, 32)
    converted = ColourSpace.from_icc(profile).to_srgb(pixels)
    assert not np.array_equal(converted, pixels)
    assert np.array_equal(converted, convert(pixels, profile, SRGB))
    assert np.array_equal(ColourSpace.from_icc(profile).from_srgb(pixels), srgb_to(profile, pixels))


@pytest.mark.parametrize("profile", WIDE_GAMUT.values(), ids=WIDE_GAMUT.keys())
def test_in_gamut_colours_round_trip_within_one_level(profile):
    space = ColourSpace.from_icc(profile)
    pixels = in_gamut_colours(profile)
    assert np.abs(space.from_srgb(space.to_srgb(pixels)).astype(int) - pixels).max() <= 1


@pytest.mark.parametrize("space", [colour.UNTAGGED, colour.CONVERTED_SRGB, ColourSpace.from_icc(LCMS_SRGB)])
def test_srgb_transforms_are_the_identity_without_imagecms(monkeypatch, space):
    monkeypatch.setattr(ImageCms, "applyTransform", lambda *args, **kwargs: pytest.fail("ImageCms was called"))
    pixels = photo(16, 8)
    assert space.to_srgb(pixels) is pixels and space.from_srgb(pixels) is pixels


def test_large_pictures_are_converted_in_bands_with_the_same_result(monkeypatch):
    pixels = photo(48, 37)
    expected = ColourSpace.from_icc(DISPLAY_P3).to_srgb(pixels)
    monkeypatch.setattr(colour, "PIXELS_PER_THREAD", 100)
    monkeypatch.setattr(colour.os, "sched_getaffinity", lambda pid: set(range(4)))
    assert np.array_equal(ColourSpace.from_icc(DISPLAY_P3).to_srgb(pixels), expected)


def test_transforms_are_built_once_per_profile(monkeypatch):
    profile = colour.rgb_profile(colour.BT2020, colour.GAMMA_22, "built once")
    space = ColourSpace.from_icc(profile)
    space.to_srgb(photo(4, 4))
    monkeypatch.setattr(ImageCms, "buildTransform", lambda *args, **kwargs: pytest.fail("a transform was rebuilt"))
    assert ColourSpace.from_icc(profile).to_srgb(photo(8, 8)).shape == (8, 8, 3)


# --- Reading and writing colour-managed pictures ----------------------------------------------------------------


@pytest.mark.parametrize("profile", WIDE_GAMUT.values(), ids=WIDE_GAMUT.keys())
@pytest.mark.parametrize("name", ["wide.png", "wide.jpg"])
def test_wide_gamut_pictures_keep_their_pixels_and_profile(tmp_path, profile, name):
    path = save(tmp_path, Image.fromarray(photo(40, 30)), name, icc_profile=profile)
    picture = read_picture(path)
    with Image.open(path) as decoded:
        assert np.array_equal(picture.pixels, np.asarray(decoded.convert("RGB")))  # byte for byte, no conversion
    assert picture.colour_space.icc_profile == profile and picture.metadata.icc_profile == profile
    assert not picture.colour_space.is_srgb
    assert np.array_equal(picture.colour_space.to_srgb(picture.pixels), convert(picture.pixels, profile, SRGB))


@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
def test_outputs_embed_the_input_profile(tmp_path, output_format):
    picture = read_picture(save(tmp_path, Image.fromarray(photo(40, 30)), "p3.png", icc_profile=DISPLAY_P3))
    encoded = encode_image(picture.pixels, output_format, 90, picture.metadata)
    with Image.open(io.BytesIO(encoded)) as output:
        assert output.info["icc_profile"] == DISPLAY_P3
        if output_format == "png":
            assert np.array_equal(np.asarray(output), picture.pixels)


@pytest.mark.parametrize("profile", [None, LCMS_SRGB], ids=["untagged", "srgb"])
def test_srgb_and_untagged_pictures_stay_byte_exact(tmp_path, profile):
    pixels = photo(20, 12)
    options = {"icc_profile": profile} if profile else {}
    picture = read_picture(save(tmp_path, Image.fromarray(pixels), "plain.png", **options))
    assert np.array_equal(picture.pixels, pixels) and picture.colour_space.is_srgb
    assert picture.colour_space.to_srgb(picture.pixels) is picture.pixels
    assert picture.metadata.icc_profile == profile
    with Image.open(io.BytesIO(encode_image(picture.pixels, "png", 90, picture.metadata))) as output:
        assert output.info.get("icc_profile") == profile and np.array_equal(np.asarray(output), pixels)


def test_cmyk_with_a_profile_is_converted_with_it(tmp_path):
    profile = cmyk_profile()
    inks = np.random.default_rng(0).integers(0, 256, (12, 16, 4), dtype=np.uint8)
    inks[0, :3] = [(0, 0, 0, 0), (0, 0, 0, 255), (255, 255, 255, 255)]  # paper, black ink, all inks
    path = save(tmp_path, Image.fromarray(inks, "CMYK"), "cmyk.jpg", icc_profile=profile, quality=100)
    picture = read_picture(path)
    with Image.open(path) as decoded:
        expected = ImageCms.profileToProfile(
            decoded,
            ImageCms.ImageCmsProfile(io.BytesIO(profile)),
            ImageCms.createProfile("sRGB"),
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
            outputMode="RGB",
            flags=ImageCms.Flags.BLACKPOINTCOMPENSATION,
        )
        naive = np.asarray(decoded.convert("RGB"))
    assert np.array_equal(picture.pixels, np.asarray(expected))
    assert not np.array_equal(picture.pixels, naive)
    assert picture.pixels[0, 0].tolist() == [255, 255, 255] and picture.pixels[0, 1].tolist() == [0, 0, 0]
    assert picture.colour_space is colour.CONVERTED_SRGB and picture.metadata.icc_profile == colour.SRGB_PROFILE


def test_cmyk_without_a_profile_is_converted_naively(tmp_path):
    path = save(tmp_path, Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "plain-cmyk.jpg")
    picture = read_picture(path)
    with Image.open(path) as decoded:
        assert np.array_equal(picture.pixels, np.asarray(decoded.convert("RGB")))
    assert picture.colour_space is colour.UNTAGGED and picture.metadata.icc_profile is None


def test_gray_with_a_gray_profile_is_converted_with_it(tmp_path):
    path = save(tmp_path, Image.new("L", (6, 4), 128), "linear-gray.png", icc_profile=gray_profile(1.0))
    picture = read_picture(path)
    # Linear 0.502 is sRGB 188: a naive read would give 128.
    assert np.abs(picture.pixels.astype(int) - 188).max() <= 1
    assert picture.colour_space is colour.CONVERTED_SRGB


def test_cielab_is_converted_to_srgb(tmp_path):
    path = save(tmp_path, Image.new("LAB", (4, 4), (128, 128, 128)), "lab.tif")  # L* 50, a* = b* = 0
    picture = read_picture(path)
    assert np.abs(picture.pixels.astype(int) - 119).max() <= 1 and picture.colour_space is colour.CONVERTED_SRGB


@pytest.mark.parametrize(
    ("profile", "warning"),
    [
        (gray_profile(2.2), "its GRAY colour profile does not fit its RGB pixels"),
        (b"junk" * 40, "its colour profile cannot be used"),
        (DISPLAY_P3.replace(b"curv", b"junk"), "its colour profile cannot be used"),
    ],
    ids=["gray-profile-on-rgb", "junk", "broken-curve"],
)
def test_unusable_profiles_are_ignored_with_a_warning(tmp_path, caplog, profile, warning):
    pixels = photo(8, 8)
    path = save(tmp_path, Image.fromarray(pixels), "odd.png", icc_profile=profile)
    with caplog.at_level(logging.WARNING):
        picture = read_picture(path)
    assert f"image: {warning}" in caplog.text
    assert np.array_equal(picture.pixels, pixels) and picture.colour_space is colour.UNTAGGED
