"""Pictures and maps for tests and measurements: textured photos made from a seed, flat and faint maps."""

import io

import numpy as np
from PIL import Image


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth test picture with texture: gradients plus noise, RGB uint8 (H, W, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=2) * 200
    return np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


FAINT = 40
"""Map value (of 255) whose strength, ~0.16, makes only the last of 4 steps active: one UNet call per output."""


def flat_map(width: int, height: int, value: int = 0) -> bytes:
    return png_bytes(np.full((height, width), value, np.uint8))


def faint_map(width: int, height: int) -> bytes:
    """Keeps the left half, changes the right half a little."""
    change_map = np.zeros((height, width), np.uint8)
    change_map[:, width // 2 :] = FAINT
    return png_bytes(change_map)
