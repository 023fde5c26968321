"""What outputs carry from the input (`OutputMetadata`):

- its ICC profile, so that kept pixels, which are the input's own bytes, display as they did (see `colour`);
- its EXIF, upright (Orientation 1, since the pixels are rotated when read), without the thumbnail (IFD1, which
  would show the unedited picture), without the maker note (its offsets point into the input file) and, unless
  keep_location, without GPS. Of the main directory only descriptive tags are kept (camera, date, author,
  resolution...): a TIFF's storage tags and embedded IPTC, Photoshop and XMP blocks describe the input file;
- its XMP only with keep_location: XMP can hold the location and other tools' state (a raw developer's crop, edit
  history), and stripping parts of untrusted XML safely would need a full parse.
"""

import logging
import re
import struct
from dataclasses import dataclass

from PIL import ExifTags, Image

log = logging.getLogger(__name__)

DESCRIPTIVE_EXIF_TAGS = tuple(
    ExifTags.Base[tag]
    for tag in (
        "ImageDescription", "Make", "Model", "XResolution", "YResolution", "ResolutionUnit", "Software", "DateTime",
        "Artist", "HostComputer", "Copyright", "Rating", "RatingPercent", "XPTitle", "XPComment", "XPAuthor",
        "XPKeywords", "XPSubject",
    )
)  # fmt: skip
"""Main-directory EXIF tags that outputs keep: they describe the shot, not how the input file stored it."""

XMP_ORIENTATION = (rb'tiff:Orientation="[0-9]"', rb"<tiff:Orientation>[0-9]</tiff:Orientation>")

EXIF_ERRORS = (OSError, SyntaxError, ValueError, EOFError, KeyError, TypeError, struct.error)
"""What Pillow raises on EXIF it cannot carry: the outputs then go without it, with a logged warning."""


@dataclass(frozen=True)
class OutputMetadata:
    """What outputs embed from the input, each where the format allows it (PNG, JPEG and WebP carry all three)."""

    icc_profile: bytes | None = None
    exif: bytes | None = None
    xmp: bytes | None = None


def detached_exif(exif: Image.Exif, name: str) -> Image.Exif:
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


def output_exif(exif: Image.Exif, width: int, height: int, keep_location: bool, name: str) -> bytes | None:
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


def output_xmp(picture: Image.Image) -> bytes | None:
    """The input's XMP without its orientation (the pixels are upright), or None when there is none."""
    xmp = picture.info.get("xmp") or picture.info.get("XML:com.adobe.xmp")
    if not xmp:
        return None
    xmp = xmp.encode("utf-8") if isinstance(xmp, str) else bytes(xmp)
    for pattern in XMP_ORIENTATION:
        xmp = re.sub(pattern, b"", xmp)
    return xmp
