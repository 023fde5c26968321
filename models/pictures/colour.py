"""Colour spaces of input pictures: ICC profiles built from primaries, and the transforms to and from sRGB.

Pictures in an RGB space keep it: their pixels are never converted, so kept pixels stay byte for byte the input's
and every output embeds the input's profile. Only what the model sees goes to sRGB (`ColourSpace.to_srgb`), and what
it generates comes back (`ColourSpace.from_srgb`); both are the identity, with no ImageCms call, for sRGB and
untagged pictures. RGB to RGB transforms use the relative colorimetric intent: in-gamut colours convert exactly and
round-trip, out-of-gamut ones clip to the sRGB gamut (so generated areas stay within it). Pictures in other spaces
(CMYK, gray, CIELAB) are converted to sRGB once, when read: relative colorimetric with black point compensation,
Photoshop's default for conversions, so blacks stay black and in-gamut colours exact.
"""

import functools
import io
import itertools
import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageCms

log = logging.getLogger(__name__)

Chromaticity = tuple[float, float]

D50 = (0.9642, 1.0, 0.8249)
"""The ICC profile connection space's white, XYZ."""

BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])

CURVE_ENTRIES = 1024
"""Samples of a piecewise transfer curve in a v2 profile (v2 has no parametric curves): under 0.1 of an 8-bit level."""

PROFILE_DATE = (2025, 1, 1, 0, 0, 0)
"""Fixed creation date of built profiles, so that the same input gives the same output bytes."""

PIXELS_PER_THREAD = 1 << 19
"""Pixels below which a transform runs on one core: threads cost more than they save on small pictures."""

SRGB_PROBE_LEVELS = np.linspace(0, 255, 17).round().astype(np.uint8)
"""Grid of colours on which a profile's conversion to sRGB must be the identity (within one level) to count as sRGB."""


@dataclass(frozen=True)
class Primaries:
    """An RGB space's red, green and blue primaries and its white, as CIE xy chromaticities."""

    name: str
    red: Chromaticity
    green: Chromaticity
    blue: Chromaticity
    white: Chromaticity


D65 = (0.3127, 0.3290)
BT709 = Primaries("BT.709", red=(0.640, 0.330), green=(0.300, 0.600), blue=(0.150, 0.060), white=D65)
"""sRGB's primaries too."""
BT601_625 = Primaries("BT.601 625-line", red=(0.640, 0.330), green=(0.290, 0.600), blue=(0.150, 0.060), white=D65)
BT601_525 = Primaries("BT.601 525-line", red=(0.630, 0.340), green=(0.310, 0.595), blue=(0.155, 0.070), white=D65)
BT2020 = Primaries("BT.2020", red=(0.708, 0.292), green=(0.170, 0.797), blue=(0.131, 0.046), white=D65)
DISPLAY_P3 = Primaries("Display P3", red=(0.680, 0.320), green=(0.265, 0.690), blue=(0.150, 0.060), white=D65)
DCI_P3 = Primaries("DCI-P3", red=(0.680, 0.320), green=(0.265, 0.690), blue=(0.150, 0.060), white=(0.314, 0.351))


@dataclass(frozen=True)
class Transfer:
    """An encoded-to-linear curve: x ** gamma, or (a * x + b) ** gamma from x = d up and c * x below (ICC's para 3)."""

    name: str
    gamma: float
    a: float = 1.0
    b: float = 0.0
    c: float = 0.0
    d: float = 0.0

    @property
    def is_pure_gamma(self) -> bool:
        return self.a == 1.0 and self.b == 0.0 and self.d == 0.0

    def decode(self, encoded: np.ndarray) -> np.ndarray:
        powered = np.power(np.maximum(self.a * encoded + self.b, 0.0), self.gamma)
        return np.where(encoded >= self.d, powered, self.c * encoded)


SRGB_CURVE = Transfer("sRGB", gamma=2.4, a=1 / 1.055, b=0.055 / 1.055, c=1 / 12.92, d=0.04045)
BT709_CURVE = Transfer("BT.709", gamma=1 / 0.45, a=1 / 1.099, b=0.099 / 1.099, c=1 / 4.5, d=0.081)
"""The inverse of BT.709's camera curve, as Chrome and Apple read nclx transfer 1, 6, 14 and 15."""
GAMMA_22 = Transfer("gamma 2.2", gamma=2.2)
GAMMA_28 = Transfer("gamma 2.8", gamma=2.8)
LINEAR = Transfer("linear", gamma=1.0)

NCLX_PRIMARIES = {1: BT709, 2: BT709, 5: BT601_625, 6: BT601_525, 7: BT601_525, 9: BT2020, 11: DCI_P3, 12: DISPLAY_P3}
"""ITU-T H.273 colour primaries codes; 2 (unspecified) is read as sRGB's, as browsers do."""

NCLX_TRANSFERS = {1: BT709_CURVE, 2: SRGB_CURVE, 4: GAMMA_22, 5: GAMMA_28, 6: BT709_CURVE, 8: LINEAR, 13: SRGB_CURVE}
NCLX_TRANSFERS |= {14: BT709_CURVE, 15: BT709_CURVE}
"""ITU-T H.273 transfer characteristics codes; 2 (unspecified) is read as sRGB's."""

NCLX_HDR_TRANSFERS = {16: "PQ", 18: "HLG"}
"""HDR curves: shown as SDR with the sRGB curve (no tone mapping), with a logged warning."""


def rgb_profile(primaries: Primaries, transfer: Transfer, description: str) -> bytes:
    """The bytes of an ICC v2 matrix/TRC display profile: what a wide-gamut photo embeds, built without a CMS.

    v2 (not v4) because every colour-managed viewer reads it; colorants are Bradford-adapted to D50 and wtpt is the
    space's own white, as in the common v2 sRGB profile.
    """
    to_xyz = _rgb_to_xyz(primaries)
    adapted = _bradford(_xyz(primaries.white), np.array(D50)) @ to_xyz
    trc = _curve_tag(transfer)
    tags = [
        (b"desc", _text_description_tag(description)),
        (b"cprt", b"text" + bytes(4) + b"No copyright, use freely\0"),
        (b"wtpt", _xyz_tag(to_xyz @ np.ones(3))),
        (b"rXYZ", _xyz_tag(adapted[:, 0])),
        (b"gXYZ", _xyz_tag(adapted[:, 1])),
        (b"bXYZ", _xyz_tag(adapted[:, 2])),
        (b"rTRC", trc),
        (b"gTRC", trc),
        (b"bTRC", trc),
    ]
    return assemble_profile(b"mntr", b"RGB ", b"XYZ ", tags)


def assemble_profile(
    device_class: bytes, colour_space: bytes, connection_space: bytes, tags: list[tuple[bytes, bytes]]
) -> bytes:
    """An ICC v2.1 profile from its header fields and its (signature, tag bytes) pairs; equal tags are stored once."""
    table_size = 4 + 12 * len(tags)
    offsets: dict[bytes, int] = {}
    entries, data = [], b""
    for signature, tag in tags:
        if tag not in offsets:  # the three TRCs of an RGB profile share one copy, as profiles usually do
            offsets[tag] = 128 + table_size + len(data)
            data += tag + bytes(-len(tag) % 4)
        entries.append(struct.pack(">4sII", signature, offsets[tag], len(tag)))
    body = struct.pack(">I", len(tags)) + b"".join(entries) + data
    header = struct.pack(
        ">I4sI4s4s4s6H4s",
        128 + len(body),
        b"",
        0x02100000,
        device_class,
        colour_space,
        connection_space,
        *PROFILE_DATE,
        b"acsp",
    )
    header += bytes(68 - len(header)) + b"".join(struct.pack(">i", _s15_16(v)) for v in D50)
    return header + bytes(128 - len(header)) + body


def nclx_profile(primaries: int, transfer: int, name: str) -> bytes | None:
    """An ICC profile equivalent to an HEIF/AVIF nclx colour description, or None for sRGB (or unknown) colour."""
    if primaries not in NCLX_PRIMARIES:
        log.warning("%s: colour primaries %d are not supported; read as sRGB's", name, primaries)
    if transfer in NCLX_HDR_TRANSFERS:
        log.warning("%s: HDR (%s) colour is read as SDR with the sRGB curve", name, NCLX_HDR_TRANSFERS[transfer])
    elif transfer not in NCLX_TRANSFERS:
        log.warning("%s: transfer characteristics %d are not supported; read as sRGB's", name, transfer)
    chosen_primaries = NCLX_PRIMARIES.get(primaries, BT709)
    chosen_transfer = NCLX_TRANSFERS.get(transfer, SRGB_CURVE)
    if chosen_primaries == BT709 and chosen_transfer == SRGB_CURVE:
        return None
    description = f"{chosen_primaries.name} primaries, {chosen_transfer.name} curve (nclx {primaries}/{transfer})"
    return rgb_profile(chosen_primaries, chosen_transfer, description)


@dataclass(frozen=True)
class ColourSpace:
    """The RGB space a picture's pixels are in, with the way to and from the sRGB that the model sees.

    A conversion's cost grows with the pixels converted (docs/BENCHMARKS.md, "Figures behind the code's choices"), so
    convert at the working size (about 1 megapixel) rather than at a large input's full size where you can.
    """

    icc_profile: bytes | None = field(repr=False)
    """What outputs embed: the input's own profile, the sRGB one for converted pictures, None when untagged."""
    is_srgb: bool
    """Whether the pixels are sRGB already: then both transforms are the identity."""
    description: str

    @classmethod
    def from_icc(cls, icc_profile: bytes) -> "ColourSpace":
        """The space of an RGB profile (check `profile_kind` first); sRGB, within one level, is told apart."""
        return cls(icc_profile, _is_srgb(icc_profile), _description(icc_profile))

    def to_srgb(self, pixels: np.ndarray) -> np.ndarray:
        """RGB uint8 (H, W, 3) in this space to sRGB; the same array back when this is sRGB."""
        return pixels if self.is_srgb else _apply(_rgb_transform(self.icc_profile, to_srgb=True), pixels)

    def from_srgb(self, pixels: np.ndarray) -> np.ndarray:
        """sRGB uint8 (H, W, 3) into this space; the same array back when this is sRGB."""
        return pixels if self.is_srgb else _apply(_rgb_transform(self.icc_profile, to_srgb=False), pixels)


@functools.lru_cache(maxsize=32)
def profile_kind(icc_profile: bytes) -> str | None:
    """The colour space an input profile describes ("RGB", "GRAY", "CMYK", "LAB"...), None when it is unusable."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile)).profile
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None
    if profile.device_class not in ("mntr", "scnr", "prtr", "spac"):  # links and abstract profiles are not sources
        return None
    return profile.xcolor_space.strip().upper()


def convert_to_srgb(picture: Image.Image, icc_profile: bytes | None) -> np.ndarray:
    """A CMYK, gray ("L") or CIELAB picture with its profile (None: CIELAB D50) as sRGB uint8 (H, W, 3)."""
    transform = ImageCms.buildTransform(
        _open_profile(icc_profile) if icc_profile is not None else ImageCms.createProfile("LAB"),
        _srgb(),
        picture.mode,
        "RGB",
        renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
        flags=ImageCms.Flags.BLACKPOINTCOMPENSATION,
    )
    return np.asarray(ImageCms.applyTransform(picture, transform))


def _apply(transform: ImageCms.ImageCmsTransform, pixels: np.ndarray) -> np.ndarray:
    """Bands of rows on all cores: lcms2 runs without the GIL, and a transform's cache is per call, so it is shared."""
    chunks = min(len(os.sched_getaffinity(0)), max(1, pixels.shape[0] * pixels.shape[1] // PIXELS_PER_THREAD))
    if chunks == 1:
        return _apply_rows(transform, pixels)
    converted = np.empty_like(pixels)
    bounds = np.linspace(0, pixels.shape[0], chunks + 1).astype(int)

    def convert_band(start: int, stop: int) -> None:
        converted[start:stop] = _apply_rows(transform, pixels[start:stop])

    with ThreadPoolExecutor(chunks) as pool:
        for band in [pool.submit(convert_band, start, stop) for start, stop in itertools.pairwise(bounds)]:
            band.result()
    return converted


def _apply_rows(transform: ImageCms.ImageCmsTransform, pixels: np.ndarray) -> np.ndarray:
    return np.asarray(ImageCms.applyTransform(Image.fromarray(np.ascontiguousarray(pixels)), transform))


@functools.lru_cache(maxsize=16)
def _rgb_transform(icc_profile: bytes, to_srgb: bool) -> ImageCms.ImageCmsTransform:
    """Built once per profile and direction: building costs milliseconds, applying it is the fast part."""
    own = _open_profile(icc_profile)
    source, target = (own, _srgb()) if to_srgb else (_srgb(), own)
    return ImageCms.buildTransform(source, target, "RGB", "RGB", ImageCms.Intent.RELATIVE_COLORIMETRIC)


@functools.lru_cache(maxsize=32)
def _is_srgb(icc_profile: bytes) -> bool:
    """Whether converting to sRGB leaves every colour of a grid within one level: the many sRGB profiles do."""
    grid = np.stack(np.meshgrid(SRGB_PROBE_LEVELS, SRGB_PROBE_LEVELS, SRGB_PROBE_LEVELS), axis=-1).reshape(1, -1, 3)
    converted = _apply(_rgb_transform(icc_profile, to_srgb=True), grid)
    return int(np.abs(converted.astype(np.int16) - grid).max()) <= 1


def _description(icc_profile: bytes) -> str:
    try:
        return ImageCms.getProfileDescription(_open_profile(icc_profile)).strip() or "unnamed profile"
    except ImageCms.PyCMSError:
        return "unnamed profile"


def _open_profile(icc_profile: bytes) -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))


@functools.cache
def _srgb() -> ImageCms.ImageCmsProfile:
    """lcms2's own sRGB (exact parametric curves) as the target of every conversion."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _xyz(chromaticity: Chromaticity) -> np.ndarray:
    x, y = chromaticity
    return np.array([x / y, 1.0, (1.0 - x - y) / y])


def _rgb_to_xyz(primaries: Primaries) -> np.ndarray:
    """The matrix taking linear RGB to XYZ (white at Y = 1), columns the primaries' XYZ."""
    columns = np.stack([_xyz(primaries.red), _xyz(primaries.green), _xyz(primaries.blue)], axis=1)
    return columns * np.linalg.solve(columns, _xyz(primaries.white))


def _bradford(source_white: np.ndarray, target_white: np.ndarray) -> np.ndarray:
    scale = (BRADFORD @ target_white) / (BRADFORD @ source_white)
    return np.linalg.inv(BRADFORD) @ np.diag(scale) @ BRADFORD


def _s15_16(value: float) -> int:
    return round(value * 65536)


def _xyz_tag(xyz: np.ndarray) -> bytes:
    return b"XYZ " + bytes(4) + struct.pack(">3i", *(_s15_16(v) for v in xyz))


def _curve_tag(transfer: Transfer) -> bytes:
    if transfer.is_pure_gamma:
        if transfer.gamma == 1.0:
            return b"curv" + bytes(4) + struct.pack(">I", 0)  # no entries: the identity
        return b"curv" + bytes(4) + struct.pack(">IH", 1, round(transfer.gamma * 256))
    samples = transfer.decode(np.linspace(0.0, 1.0, CURVE_ENTRIES))
    table = np.round(np.clip(samples, 0.0, 1.0) * 65535).astype(">u2").tobytes()
    return b"curv" + bytes(4) + struct.pack(">I", CURVE_ENTRIES) + table


def _text_description_tag(text: str) -> bytes:
    ascii_text = text.encode("ascii", "replace") + b"\0"
    return b"desc" + bytes(4) + struct.pack(">I", len(ascii_text)) + ascii_text + bytes(4 + 4 + 2 + 1 + 67)


# Built from the functions above, so defined last.
SRGB_PROFILE = rgb_profile(BT709, SRGB_CURVE, "sRGB")
"""What outputs converted to sRGB (from CMYK, gray or CIELAB) embed: small, and the same bytes every run."""

UNTAGGED = ColourSpace(None, True, "untagged (sRGB)")
CONVERTED_SRGB = ColourSpace(SRGB_PROFILE, True, "sRGB")
