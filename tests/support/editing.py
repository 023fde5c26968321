"""Helpers the tests share: edits on the tiny pipeline, valid options, and pictures made to be refused."""

import struct
import zlib

import numpy as np

from models.pipeline import EditRequest


def edit(pipeline, image, change_map, **options):
    request = EditRequest(image=image, change_map=change_map.astype(np.float32), prompt="a red boat", **options)
    return pipeline.edit(request).images


def half_map(height, width, value=1.0):
    change_map = np.zeros((height, width), np.float32)
    change_map[:, width // 2 :] = value
    return change_map


def changed_amount(output, image):
    return np.abs(output.astype(np.int16) - image).mean()


VALID = {
    "prompt": "a cat",
    "negative_prompt": "",
    "steps": 4,
    "strength": 1.0,
    "invert_map": False,
    "guidance_scale": 0.0,
    "num_outputs": 1,
    "seed": 7,
}


def png_header_only(width: int, height: int) -> bytes:
    """A few-byte PNG that claims a huge size: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
