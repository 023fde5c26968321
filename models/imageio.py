"""Reading pictures and maps safely, and encoding results: the only module that touches image files.

What outputs carry from the input (`OutputMetadata`):
- its ICC profile, so that kept pixels, which are the input's own bytes, display as they did (see `models.colour`);
- its EXIF, upright (Orientation 1, since the pixels are rotated when read), without the thumbnail (IFD1, which
  would show the unedited picture), without the maker note (its offsets point into the input file) and, unless
  keep_location, without GPS. Of the main directory only descriptive tags are kept (camera, date, author,
  resolution...): a TIFF's storage tags and embedded IPTC, Photoshop and XMP blocks describe the input file;
- its XMP only with keep_location: XMP can hold the location and other tools' state (a raw developer's crop, edit
  history), and stripping parts of untrusted XML safely would need a full parse.
"""

import io
import logging
import os
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pillow_heif
from PIL import ExifTags, Image, ImageCms, ImageOps, PngImagePlugin, UnidentifiedImageError

from . import colour
from .colour import ColourSpace
from .errors import InputError
from .limits import MAX_INPUT_BYTES, MAX_INPUT_PIXELS

log = logging.getLogger(__name__)

pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)

READABLE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF")
"""Formats decoded in-process (HEIF by pillow-heif, the rest by Pillow); others (EPS via Ghostscript) are refused."""

READABLE_NAMES = "PNG, JPEG, WebP, GIF, BMP, TIFF, HEIC, AVIF"

OUTPUT_FORMATS = ("webp", "png", "jpg")

Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
GRAY_MODES = ("1", "L", "LA", "La", "F", *SIXTEEN_BIT_MODES)
RGB_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "YCbCr")

ROTATED_ORIENTATIONS = (5, 6, 7, 8)
"""EXIF orientations that display the picture turned by 90 degrees: width and height swap."""

DESCRIPTIVE_EXIF_TAGS = tuple(
    ExifTags.Base[tag]
    for tag in (
        "ImageDescription", "Make", "Model", "XResolution", "YResolution", "ResolutionUnit", "Software", "DateTime",
        "Artist", "HostComputer", "Copyright", "Rating", "RatingPercent", "XPTitle", "XPComment", "XPAuthor",
        "XPKeywords", "XPSubject",
    )
)  # fmt: skip
"""Main-directory EXIF tags that outputs keep: they describe the shot, not how the input file stored it."""

JPEG_MARKER_BYTES = 65533
"""Most a JPEG APP marker holds: EXIF or XMP beyond it cannot go into a JPEG."""

XMP_ORIENTATION = (rb'tiff:Orientation="[0-9]"', rb"<tiff:Orientation>[0-9]</tiff:Orientation>")

EXIF_ERRORS = (OSError, SyntaxError, ValueError, EOFError, KeyError, TypeError, struct.error)
"""What Pillow raises on EXIF it cannot carry: the outputs then go without it, with a logged warning."""


@dataclass(frozen=True)
class OutputMetadata:
    """What outputs embed from the input, each where the format allows it (PNG, JPEG and WebP carry all three)."""

    icc_profile: bytes | None = None
    exif: bytes | None = None
    xmp: bytes | None = None


@dataclass(frozen=True, eq=False)
class Picture:
    """A decoded input picture: pixels in its own colour space, the way to sRGB and back, and what outputs carry."""

    pixels: np.ndarray
    """RGB uint8 (H, W, 3), upright, in colour_space."""
    colour_space: ColourSpace
    metadata: OutputMetadata


@dataclass(frozen=True)
class _Decoded:
    image: Image.Image
    """Upright and loaded."""
    exif: Image.Exif
    """As in the file, Orientation included."""
    format: str


def _open_header(path: Path, name: str) -> Image.Image:
    """Open a picture without decoding it, refusing empty, oversized and unreadable files and bombs."""
    if path is None:
        raise InputError(f"{name}: required; give a picture file ({READABLE_NAMES})")
    path = Path(path)
    size_bytes = os.path.getsize(path)
    if size_bytes == 0:
        raise InputError(f"{name}: the file is empty")
    if size_bytes > MAX_INPUT_BYTES:
        raise InputError(f"{name}: the file is {size_bytes / 2**20:.0f} MiB; at most {MAX_INPUT_BYTES // 2**20} MiB")
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1x and 2x its limit; the explicit check below refuses those with a clear error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            picture = Image.open(path, formats=READABLE_FORMATS)
    except Image.DecompressionBombError:
        raise InputError(f"{name}: larger than {MAX_INPUT_PIXELS:,} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, RuntimeError):
        raise InputError(f"{name}: not a readable picture; allowed: {READABLE_NAMES}") from None
    width, height = picture.size
    if picture.format in ("HEIF", "AVIF"):
        width, height = max((width, height), _largest_item(path) or (0, 0), key=lambda size: size[0] * size[1])
    if width * height > MAX_INPUT_PIXELS:
        picture.close()
        raise InputError(f"{name}: {width}x{height} is larger than {MAX_INPUT_PIXELS:,} pixels")
    return picture


def picture_size(path: Path, name: str = "image") -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation applied), read from the header alone: cheap before a decode."""
    with _open_header(path, name) as picture:
        width, height = picture.size
        try:
            orientation = picture.getexif().get(ExifTags.Base.Orientation)
        except (OSError, SyntaxError, ValueError, EOFError):
            orientation = None  # a broken EXIF block is reported when the picture is decoded
    return (height, width) if orientation in ROTATED_ORIENTATIONS else (width, height)


def _open(path: Path, name: str) -> _Decoded:
    """Open and decode the first frame, upright; bombs are refused from the header before any large allocation."""
    with _open_header(path, name) as picture:
        if getattr(picture, "n_frames", 1) > 1:
            log.warning("%s: animated or multi-page file, using its first frame", name)
        try:
            picture.load()
            exif = picture.getexif()  # before turning the picture upright, which drops what a TIFF's EXIF holds
            upright = ImageOps.exif_transpose(picture)
        except Image.DecompressionBombError:
            raise InputError(f"{name}: larger than {MAX_INPUT_PIXELS:,} pixels") from None
        except (OSError, SyntaxError, ValueError, EOFError, RuntimeError):
            raise InputError(f"{name}: the file is truncated or corrupt") from None
        return _Decoded(upright, _detached(exif, name), picture.format)


def _detached(exif: Image.Exif, name: str) -> Image.Exif:
    """A copy that needs no open file: a TIFF's EXIF reads its directories from the file when asked."""
    if not exif:
        return exif
    try:
        copy = Image.Exif()
        copy.load(exif.tobytes())
    except EXIF_ERRORS:
        log.warning("%s: its EXIF cannot be carried into the outputs and is left out", name)
        return Image.Exif()
    return copy


def _sixteen_bit_to_unit(picture: Image.Image) -> np.ndarray:
    return np.clip(np.asarray(picture, dtype=np.float32) / 65535.0, 0.0, 1.0)


def read_picture(path: Path, name: str = "image", keep_location: bool = False) -> Picture:
    """Decode a picture, upright, to RGB uint8 in its own colour space (or sRGB for CMYK, gray or CIELAB ones).

    Alpha is flattened onto white. keep_location keeps EXIF GPS and XMP in the outputs' metadata.
    """
    decoded = _open(path, name)
    pixels, colour_space = _colour_managed_rgb(decoded, Path(path), name)
    log.info("%s: colour space %s", name, colour_space.description)
    height, width = pixels.shape[:2]
    metadata = OutputMetadata(
        icc_profile=colour_space.icc_profile,
        exif=_output_exif(decoded.exif, width, height, keep_location, name),
        xmp=_output_xmp(decoded.image) if keep_location else None,
    )
    return Picture(pixels, colour_space, metadata)


def read_image(path: Path, name: str = "image") -> np.ndarray:
    """The pixels of `read_picture`: RGB uint8 (H, W, 3), upright, in the picture's own colour space."""
    return read_picture(path, name).pixels


def _eight_bit_rgb(picture: Image.Image, name: str) -> np.ndarray:
    """RGB uint8 (H, W, 3) from any mode, without colour management: 16-bit scaled, alpha flattened onto white."""
    if picture.mode in SIXTEEN_BIT_MODES:
        gray = np.round(_sixteen_bit_to_unit(picture) * 255.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if picture.mode == "F":
        gray = np.clip(np.round(np.asarray(picture, dtype=np.float32)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if (picture.mode == "P" and "transparency" in picture.info) or picture.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        log.warning("%s: transparent areas flattened onto white", name)
        rgba = picture.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat.alpha_composite(rgba)
        picture = flat
    return np.asarray(picture.convert("RGB"))


def _colour_managed_rgb(decoded: _Decoded, path: Path, name: str) -> tuple[np.ndarray, ColourSpace]:
    """RGB pixels and their space: RGB profiles (ICC or nclx) are kept, others are converted to sRGB."""
    picture = decoded.image
    if picture.mode == "LAB":  # CIELAB needs no profile to mean a colour
        return colour.convert_to_srgb(picture, None), colour.CONVERTED_SRGB
    rgb = _eight_bit_rgb(picture, name)
    icc_profile = picture.info.get("icc_profile") or None
    if icc_profile is not None:
        return _with_profile(picture, rgb, icc_profile, name) or (rgb, colour.UNTAGGED)
    nclx = _nclx(decoded, path)
    built = colour.nclx_profile(*nclx, name) if nclx else None  # gray with nclx too: R = G = B in that RGB space
    return rgb, (ColourSpace.from_icc(built) if built else colour.UNTAGGED)


def _with_profile(
    picture: Image.Image, rgb: np.ndarray, icc_profile: bytes, name: str
) -> tuple[np.ndarray, ColourSpace] | None:
    """The pixels in the profile's RGB space, or converted to sRGB with it; None, with a warning, if it cannot serve."""
    kind = colour.profile_kind(icc_profile)
    try:
        if kind == "RGB" and picture.mode in RGB_MODES:
            return rgb, ColourSpace.from_icc(icc_profile)
        if kind == "GRAY" and picture.mode in GRAY_MODES:
            return colour.convert_to_srgb(Image.fromarray(rgb[:, :, 0]), icc_profile), colour.CONVERTED_SRGB
        if kind == "CMYK" and picture.mode == "CMYK":
            return colour.convert_to_srgb(picture, icc_profile), colour.CONVERTED_SRGB
    except ImageCms.PyCMSError:
        kind = None  # it parses but lcms2 cannot build a transform from it
    if kind is None:
        log.warning("%s: its colour profile cannot be used; colours read as sRGB", name)
    else:
        log.warning(
            "%s: its %s colour profile does not fit its %s pixels; colours read as sRGB", name, kind, picture.mode
        )
    return None


def _nclx(decoded: _Decoded, path: Path) -> tuple[int, int] | None:
    """(colour primaries, transfer characteristics) from a HEIF or AVIF nclx colour description, if any."""
    if decoded.format == "HEIF":
        description = decoded.image.info.get("nclx_profile")
        return (description["color_primaries"], description["transfer_characteristics"]) if description else None
    if decoded.format == "AVIF":
        return _avif_nclx(path)
    return None


def _avif_nclx(path: Path) -> tuple[int, int] | None:
    """The nclx of an AVIF's primary item, read from its boxes: Pillow's AVIF plugin exposes ICC profiles only.

    An animated AVIF keeps its colour in its track, not read here: it is then read as sRGB.
    """
    properties = _item_properties(path)
    for index in properties.primary or range(len(properties.boxes)):
        kind, payload = properties.boxes[index]
        if kind == b"colr" and payload[:4] == b"nclx" and len(payload) >= 8:
            primaries, transfer = struct.unpack_from(">HH", payload, 4)
            return primaries, transfer
    return None


def _largest_item(path: Path) -> tuple[int, int] | None:
    """The largest (width, height) that a HEIF or AVIF file's items claim in their ispe boxes, before any crop.

    The decoders report the primary item's size after its crop (clap), so a small crop of a huge image would
    otherwise pass the pixel limit.
    """
    sizes = [
        struct.unpack_from(">II", payload, 4)
        for kind, payload in _item_properties(path).boxes
        if kind == b"ispe" and len(payload) >= 12
    ]
    return max(sizes, key=lambda size: size[0] * size[1], default=None)


@dataclass(frozen=True)
class _ItemProperties:
    boxes: list[tuple[bytes, bytes]]
    """(type, payload) of each item property (the ipco boxes) of a HEIF or AVIF file."""
    primary: list[int]
    """Indices in boxes of the primary item's properties; empty when unknown."""


def _item_properties(path: Path) -> _ItemProperties:
    """Read from the file's meta box; what is missing or malformed is left out (the decoder judges the file)."""
    try:
        with open(path, "rb") as file:
            meta = _top_level_box(file, b"meta")
    except (OSError, struct.error):
        meta = None
    if meta is None:
        return _ItemProperties([], [])
    children = dict(_boxes(meta[4:]))  # meta is a full box: version and flags first
    properties = dict(_boxes(children.get(b"iprp", b"")))
    boxes = list(_boxes(properties.get(b"ipco", b"")))
    try:
        indices = _associations(properties.get(b"ipma", b""), _primary_item(children.get(b"pitm")))
    except (struct.error, IndexError):
        indices = []
    return _ItemProperties(boxes, [index - 1 for index in indices if 0 < index <= len(boxes)])


def _top_level_box(file: io.BufferedReader, wanted: bytes) -> bytes | None:
    while header := file.read(8):
        size, kind = struct.unpack(">I4s", header)
        header_size = 8
        if size == 1:
            (size,) = struct.unpack(">Q", file.read(8))
            header_size = 16
        elif size == 0:  # to the end of the file
            size = MAX_INPUT_BYTES
        if size < header_size:
            return None
        if kind == wanted:
            return file.read(min(size, MAX_INPUT_BYTES) - header_size)
        file.seek(size - header_size, os.SEEK_CUR)
    return None


def _boxes(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(type, payload) of each ISO-BMFF box in data; a box running past the end ends the walk."""
    offset = 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, offset)
        header_size = 8
        if size == 1 and offset + 16 <= len(data):
            (size,) = struct.unpack_from(">Q", data, offset + 8)
            header_size = 16
        elif size == 0:
            size = len(data) - offset
        if size < header_size or offset + size > len(data):
            return
        yield kind, data[offset + header_size : offset + size]
        offset += size


def _primary_item(pitm: bytes | None) -> int | None:
    if not pitm:
        return None
    return struct.unpack_from(">H" if pitm[0] == 0 else ">I", pitm, 4)[0]


def _associations(ipma: bytes, item: int | None) -> list[int]:
    """The 1-based ipco indices of an item's properties (of all items when item is None), from an ipma box."""
    if not ipma:
        return []
    version, flags = ipma[0], int.from_bytes(ipma[1:4], "big")
    (count,) = struct.unpack_from(">I", ipma, 4)
    item_format = ">H" if version < 1 else ">I"
    offset, indices = 8, []
    for _ in range(count):
        (entry_item,) = struct.unpack_from(item_format, ipma, offset)
        offset += struct.calcsize(item_format)
        associations = ipma[offset]
        offset += 1
        for _ in range(associations):
            if flags & 1:
                index = struct.unpack_from(">H", ipma, offset)[0] & 0x7FFF
                offset += 2
            else:
                index = ipma[offset] & 0x7F
                offset += 1
            if item is None or entry_item == item:
                indices.append(index)
    return indices


def _output_exif(exif: Image.Exif, width: int, height: int, keep_location: bool, name: str) -> bytes | None:
    """The input's EXIF as outputs carry it (see the module's docstring), or None when there is none."""
    if not exif:
        return None
    try:
        kept = Image.Exif()
        for tag in DESCRIPTIVE_EXIF_TAGS:
            if tag in exif:
                kept[tag] = exif[tag]
        kept[ExifTags.Base.Orientation] = 1
        shot = {tag: value for tag, value in exif.get_ifd(ExifTags.IFD.Exif).items() if tag != ExifTags.IFD.MakerNote}
        if interop := exif.get_ifd(ExifTags.IFD.Interop):
            shot[ExifTags.IFD.Interop] = dict(interop)
        else:
            shot.pop(ExifTags.IFD.Interop, None)
        for tag, value in ((ExifTags.Base.ExifImageWidth, width), (ExifTags.Base.ExifImageHeight, height)):
            if tag in shot:
                shot[tag] = value  # the size of the upright output, not of the stored input
        if shot:
            kept[ExifTags.IFD.Exif] = shot
        if keep_location and (location := exif.get_ifd(ExifTags.IFD.GPSInfo)):
            kept[ExifTags.IFD.GPSInfo] = dict(location)
        return kept.tobytes()
    except EXIF_ERRORS:
        log.warning("%s: its EXIF cannot be carried into the outputs and is left out", name)
        return None


def _output_xmp(picture: Image.Image) -> bytes | None:
    """The input's XMP without its orientation (the pixels are upright), or None when there is none."""
    xmp = picture.info.get("xmp") or picture.info.get("XML:com.adobe.xmp")
    if not xmp:
        return None
    xmp = xmp.encode("utf-8") if isinstance(xmp, str) else bytes(xmp)
    for pattern in XMP_ORIENTATION:
        xmp = re.sub(pattern, b"", xmp)
    return xmp


def read_map(path: Path, name: str = "map") -> np.ndarray:
    """Decode a change map to float32 (H, W) in [0, 1]: luminance, times alpha where there is one.

    Maps are data, not colour: no colour management.
    """
    picture = _open(path, name).image
    if picture.mode in SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_unit(picture)
    if picture.mode == "F":
        return np.clip(np.asarray(picture, dtype=np.float32), 0.0, 1.0)
    if picture.mode == "P":
        picture = picture.convert("RGBA" if "transparency" in picture.info else "RGB")
    if "A" in picture.getbands():
        luminance_alpha = np.asarray(picture.convert("LA"), dtype=np.float32) / 255.0
        return luminance_alpha[:, :, 0] * luminance_alpha[:, :, 1]
    return np.asarray(picture.convert("L"), dtype=np.float32) / 255.0


def encode_image(pixels: np.ndarray, output_format: str, quality: int, metadata: OutputMetadata | None = None) -> bytes:
    """Encode RGB uint8 (H, W, 3) with the input's metadata; settings keep encoding far cheaper than the GPU work."""
    metadata = metadata or OutputMetadata()
    options: dict = {}
    if metadata.icc_profile:
        options["icc_profile"] = metadata.icc_profile
    if metadata.exif:
        options["exif"] = metadata.exif
    picture = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if output_format == "png":
        if metadata.xmp:
            text = PngImagePlugin.PngInfo()
            text.add_itxt("XML:com.adobe.xmp", metadata.xmp)
            options["pnginfo"] = text
        picture.save(buffer, format="PNG", compress_level=1, **options)
    elif output_format == "jpg":
        if metadata.xmp:
            options["xmp"] = metadata.xmp
        for key, overhead in (("exif", 0), ("xmp", len(b"http://ns.adobe.com/xap/1.0/\0"))):
            if key in options and len(options[key]) + overhead > JPEG_MARKER_BYTES:
                log.warning(
                    "output: the input's %s (%d bytes) does not fit in a JPEG; left out", key, len(options[key])
                )
                del options[key]
        picture.save(buffer, format="JPEG", quality=quality, **options)
    elif output_format == "webp":
        if metadata.xmp:
            options["xmp"] = metadata.xmp
        picture.save(buffer, format="WEBP", quality=quality, method=2, **options)
    else:
        raise InputError(f"output_format: {output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    return buffer.getvalue()


def write_outputs(
    images: list[np.ndarray],
    folder: Path,
    output_format: str,
    quality: int,
    metadata: OutputMetadata | None = None,
) -> list[Path]:
    """Write each result as folder/out-N.<format>, each with the input's metadata."""
    paths = []
    for index, pixels in enumerate(images):
        path = Path(folder) / f"out-{index}.{output_format}"
        path.write_bytes(encode_image(pixels, output_format, quality, metadata))
        paths.append(path)
    return paths
