"""Where a request's change map comes from, and the picture the model starts from.

The rule (the README's "Maps nobody has to paint"): the map is the product of the sources given, an uploaded `map`,
`map_prompt`'s segmentation and `map_depth`'s depth, so each one given restricts the others (an uploaded map with
map_prompt changes only the prompt's area, and only as much as the map says). With none of those, an image with
transparency is the map (transparent pixels change, opaque ones are kept, partial alpha changes partly).
`extend_*` adds new canvas on top of any of them, or is the only change when nothing else is given. Nothing that
says what changes is one error naming the ways.

The order: the sources' product at the image's size, `invert_map`, near-black to black, the outpainting's canvas
and seam, `map_grow`, `map_blur`, `map_negative_prompt` (what it names is kept, however far grow and blur reach),
`strength`; the outpainting's new area is 1 whatever came before (it has no pixels to keep). Pixels a fill gave
colours (transparency, the new area) are the input's again wherever the final map is 0.
"""

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..errors import InputError
from ..inputs import EditOptions
from ..limits import MAX_MAP_PROMPTS
from ..pictures.read import Picture, read_map
from . import shaping
from .fill import fill_unknown
from .outpaint import Extension

log = logging.getLogger(__name__)

NO_SOURCE = (
    "map: required unless something else says what changes: give a map, map_prompt, map_depth, an image with"
    " transparency, or extend_* to outpaint"
)

PROMPT_PEAK_FLOOR = 0.2
"""A prompt's probabilities are divided by their peak, so that what it names is ~1 however sure CLIPSeg is; by at
least this, so that a prompt that matches nothing (CLIPSeg's peak then stays at a few percent) is not blown up into a
map of its noise."""

PROMPT_THRESHOLD = 0.3
"""Normalised probability below which a pixel counts as not named by the prompt, kept exactly; above, the map rises
linearly to 1 at the peak, so it is continuous and soft at the object's edge."""

NEGATIVE_FULL_AT = 0.6
"""Normalised probability from which map_negative_prompt keeps a pixel fully (it rises from PROMPT_THRESHOLD): what
it names is kept, not merely changed less, while its edge stays soft."""

DEPTH_PERCENTILES = (0.02, 0.98)
"""The nearest and farthest depth are read at these quantiles, so that a few outlying pixels do not set the scale."""


class Segmenter(Protocol):
    def probabilities(self, pixels: np.ndarray, prompts: list[str]) -> torch.Tensor: ...


class DepthModel(Protocol):
    def nearness(self, pixels: np.ndarray) -> torch.Tensor: ...


@dataclass(frozen=True)
class Prepared:
    """The picture the model edits (on the extended canvas, transparent areas filled) and its map, ready."""

    pixels: np.ndarray
    """RGB uint8 (H, W, 3): the input's pixels wherever the map keeps them."""
    change_map: torch.Tensor
    """(H, W) float in [0, 1], after every step of the module's order."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds of each model run (map_prompt, map_depth)."""


def extension_of(options: EditOptions, width: int, height: int) -> Extension | None:
    """The request's outpainting for a picture of width x height, checked; None when it asks for none."""
    return Extension.checked(
        options.extend_left, options.extend_right, options.extend_top, options.extend_bottom, width, height
    )


def transparency(picture: Picture) -> np.ndarray | None:
    """The picture's alpha where some pixel is less than opaque, else None."""
    alpha = picture.alpha
    return alpha if alpha is not None and int(alpha.min()) < 255 else None


def phrases(name: str, text: str) -> list[str]:
    """A map prompt's comma-separated phrases, at most MAX_MAP_PROMPTS."""
    found = [phrase.strip() for phrase in text.split(",") if phrase.strip()]
    if not found:
        raise InputError(f"{name}: no words between the commas in {text!r}")
    if len(found) > MAX_MAP_PROMPTS:
        raise InputError(f"{name}: at most {MAX_MAP_PROMPTS} phrases separated by commas, got {len(found)}")
    return found


def named_area(probabilities: torch.Tensor, prompts: list[str], name: str, full_at: float = 1.0) -> torch.Tensor:
    """The union (per-pixel maximum) of each prompt's map: its probabilities over its peak (at least
    PROMPT_PEAK_FLOOR), zero below PROMPT_THRESHOLD and rising linearly to 1 at full_at. (N, h, w) -> (h, w)."""
    peaks = probabilities.amax(dim=(1, 2))
    for prompt, peak in zip(prompts, peaks.tolist(), strict=True):
        log.info("%s: %r found with a best match of %.0f%%", name, prompt, 100 * peak)
        if peak < PROMPT_PEAK_FLOOR:
            log.warning("%s: %r is barely in the picture (best match %.0f%%)", name, prompt, 100 * peak)
    normalised = probabilities / peaks.clamp_min(PROMPT_PEAK_FLOOR)[:, None, None]
    return ((normalised - PROMPT_THRESHOLD) / (full_at - PROMPT_THRESHOLD)).clamp(0.0, 1.0).amax(dim=0)


def start_from_fill(pixels: np.ndarray, alpha: np.ndarray, seed: int) -> np.ndarray:
    """Where a picture is transparent, the colours to start from: the fill (fill_unknown) where alpha is 0, the
    picture's own colour where it is opaque, and between them in proportion to alpha. `pixels` were flattened onto
    white (a * colour + (1 - a) * 255), so the blend a * colour + (1 - a) * fill is pixels + (1 - a) * (fill - 255)."""
    filled = fill_unknown(pixels, alpha == 255, seed).astype(np.float32)
    transparency = 1.0 - alpha[:, :, None].astype(np.float32) / 255.0
    return np.clip(np.round(pixels + transparency * (filled - 255.0)), 0, 255).astype(np.uint8)


def depth_map(nearness: torch.Tensor, end: str, share: float) -> torch.Tensor:
    """A map from relative nearness (large = near): 0 to 1 across the share of the depth span nearest the chosen
    end ("far" or "near"), rising toward that end; 0 elsewhere."""
    low, high = torch.quantile(nearness.flatten().float(), torch.tensor(DEPTH_PERCENTILES)).tolist()
    if high - low <= 1e-6 * max(abs(high), abs(low), 1e-30):
        log.warning("map_depth: the depth model sees no depth differences; the picture counts as one distance")
        closeness = torch.full_like(nearness, 0.5)
    else:
        closeness = ((nearness - low) / (high - low)).clamp(0.0, 1.0)
    toward_end = 1.0 - closeness if end == "far" else closeness
    return ((toward_end - (1.0 - share)) / share).clamp(0.0, 1.0)


def prepare(
    picture: Picture,
    map_path: Path | None,
    options: EditOptions,
    extension: Extension | None,
    segmenter: Segmenter | None = None,
    depth: DepthModel | None = None,
) -> Prepared:
    """The picture to edit and its change map, from whichever sources the request gives (the module's rule)."""
    height, width = picture.pixels.shape[:2]
    alpha = transparency(picture)
    pixels, timings = picture.pixels, {}
    sources = []
    if map_path is not None:
        uploaded = torch.from_numpy(read_map(map_path, "map"))
        if uploaded.shape != (height, width):
            log.warning("map: %dx%d resized to the image's %dx%d", uploaded.shape[1], uploaded.shape[0], width, height)
        sources.append(shaping.fit_to_image(uploaded, width, height))
    if options.map_prompt:
        started = time.perf_counter()
        prompts = phrases("map_prompt", options.map_prompt)
        named = named_area(segmenter.probabilities(pixels, prompts), prompts, "map_prompt")
        if not named.any():
            raise InputError(f"map_prompt: {options.map_prompt!r} was not found in the picture; try other words")
        sources.append(shaping.resize_map(named, height, width))
        timings["map_prompt"] = time.perf_counter() - started
    if options.map_depth != "off":
        started = time.perf_counter()
        made = depth_map(depth.nearness(pixels), options.map_depth, options.map_depth_range)
        sources.append(shaping.resize_map(made, height, width))
        timings["map_depth"] = time.perf_counter() - started
    if sources:
        source = torch.stack(sources).prod(dim=0) if len(sources) > 1 else sources[0]
        if alpha is not None:
            log.warning("image: transparent areas flattened onto white (the map inputs say what changes)")
    elif alpha is not None:
        log.info("image: its transparency is the change map (transparent pixels change, opaque ones are kept)")
        source = 1.0 - torch.tensor(alpha, dtype=torch.float32) / 255.0
        pixels = start_from_fill(picture.pixels, alpha, options.seed)
    elif extension is not None:
        source = None
    elif picture.alpha is not None:
        raise InputError(f"{NO_SOURCE} (the image's alpha channel is opaque everywhere, so it changes nothing)")
    else:
        raise InputError(NO_SOURCE)
    if source is not None and options.invert_map:
        source = 1.0 - source
    keep = None
    if options.map_negative_prompt:
        started = time.perf_counter()
        prompts = phrases("map_negative_prompt", options.map_negative_prompt)
        probabilities = segmenter.probabilities(picture.pixels, prompts)
        keep = shaping.resize_map(
            named_area(probabilities, prompts, "map_negative_prompt", NEGATIVE_FULL_AT), height, width
        )
        timings["map_negative_prompt"] = time.perf_counter() - started
    if extension is not None:
        canvas_width, canvas_height = extension.canvas_size
        log.info(
            "extend: canvas %dx%d from %dx%d (left %d, right %d, top %d, bottom %d; seam %d px)",
            canvas_width, canvas_height, width, height, extension.left, extension.right, extension.top,
            extension.bottom, extension.seam,
        )  # fmt: skip
        pixels = extension.canvas_pixels(pixels, options.seed)
    change_map = shaping.prepare(
        torch.zeros(height, width) if source is None else source,
        grow=options.map_grow,
        blur=options.map_blur,
        strength=options.strength,
        extension=extension,
        keep=keep,
    )
    if pixels is not picture.pixels:  # filled somewhere: where the map keeps, the input's pixels, chosen
        inside = extension.inside if extension is not None else (slice(None), slice(None))
        pixels[inside] = np.where((change_map[inside] == 0).numpy()[:, :, None], picture.pixels, pixels[inside])
    return Prepared(pixels, change_map, timings)
