"""ISO-BMFF boxes of HEIF and AVIF files: what the decoders do not expose, read from the file's own bytes.

Only the meta box's item properties are read (sizes before a crop, colour descriptions); a box that is missing,
malformed or runs past its parent is left out, and the decoder judges the file.
"""

import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..limits import MAX_INPUT_BYTES


def avif_nclx(path: Path) -> tuple[int, int] | None:
    """The nclx of an AVIF's primary item, read from its boxes: Pillow's AVIF plugin exposes ICC profiles only.

    An animated AVIF keeps its colour in its track, not read here: it is then read as sRGB.
    """
    properties = item_properties(path)
    for index in properties.primary or range(len(properties.boxes)):
        kind, payload = properties.boxes[index]
        if kind == b"colr" and payload[:4] == b"nclx" and len(payload) >= 8:
            primaries, transfer = struct.unpack_from(">HH", payload, 4)
            return primaries, transfer
    return None


def largest_item(path: Path) -> tuple[int, int] | None:
    """The largest (width, height) that a HEIF or AVIF file's items claim in their ispe boxes, before any crop.

    The decoders report the primary item's size after its crop (clap), so a small crop of a huge image would
    otherwise pass the pixel limit.
    """
    sizes = [
        struct.unpack_from(">II", payload, 4)
        for kind, payload in item_properties(path).boxes
        if kind == b"ispe" and len(payload) >= 12
    ]
    return max(sizes, key=lambda size: size[0] * size[1], default=None)


@dataclass(frozen=True)
class ItemProperties:
    boxes: list[tuple[bytes, bytes]]
    """(type, payload) of each item property (the ipco boxes) of a HEIF or AVIF file."""
    primary: list[int]
    """Indices in boxes of the primary item's properties; empty when unknown."""


def item_properties(path: Path) -> ItemProperties:
    """Read from the file's meta box; what is missing or malformed is left out (the decoder judges the file)."""
    try:
        with open(path, "rb") as file:
            meta = _top_level_box(file, b"meta")
    except (OSError, struct.error):
        meta = None
    if meta is None:
        return ItemProperties([], [])
    children = dict(_boxes(meta[4:]))  # meta is a full box: version and flags first
    properties = dict(_boxes(children.get(b"iprp", b"")))
    boxes = list(_boxes(properties.get(b"ipco", b"")))
    try:
        indices = _associations(properties.get(b"ipma", b""), _primary_item(children.get(b"pitm")))
    except (struct.error, IndexError):
        indices = []
    return ItemProperties(boxes, [index - 1 for index in indices if 0 < index <= len(boxes)])


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
