"""Editing on a crop against the whole picture: a 500x500 edit in a 4000x3000 photo (the default), the working pixels
per changed pixel of both paths and their times, run alternately."""

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ... import cropping
from ...editor import edit_files
from ...inputs import EditOptions
from ...maps import shaping
from ...sizing import WORKING_AREA, working_size
from ...weights.load import load_pipeline
from .table import Table


def measure_crop(weights: Path, width: int = 4000, height: int = 3000, edit: int = 500, repeats: int = 3) -> Table:
    pipeline = load_pipeline(weights)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    change_map = np.zeros((height, width), np.uint8)
    top, left = (height - edit) // 2, (width - edit) // 2
    change_map[top : top + edit, left : left + edit] = 255
    crop = cropping.choose_crop(shaping.prepare(torch.from_numpy(change_map / 255.0)))
    whole_size = working_size(width, height)
    table = Table(f"{weights}: {width}x{height}, a {edit}x{edit} edit, working area {WORKING_AREA}")
    whole_density = whole_size[0] * whole_size[1] / (width * height)
    table.add("whole picture: working size", f"{whole_size[0]}x{whole_size[1]}, {whole_density:.3f} working px per"
              " changed px", whole_density=whole_density)  # fmt: skip
    if crop is not None:
        crop_size = working_size(crop.width, crop.height, crop.working_area)
        density = crop_size[0] * crop_size[1] / (crop.width * crop.height)
        box = f"{crop.width}x{crop.height} at {crop_size[0]}x{crop_size[1]}"
        table.add("crop: box and working size", f"{box}, {density:.3f} working px per changed px", crop_density=density)
    values = {"prompt": "a red boat", "seed": 1}
    times: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as scratch:
        image, mask = Path(scratch) / "photo.png", Path(scratch) / "map.png"
        Image.fromarray(pixels).save(image, compress_level=1)
        Image.fromarray(change_map).save(mask)
        for _ in range(repeats):
            for crop_to_map in (True, False):
                started = time.perf_counter()
                edit_files(pipeline, image, mask, EditOptions.from_values({**values, "crop_to_map": crop_to_map}))
                times[crop_to_map].append(time.perf_counter() - started)
    for crop_to_map, label in ((True, "crop"), (False, "whole picture")):
        runs = ", ".join(f"{seconds:.2f}" for seconds in times[crop_to_map])
        table.add(f"{label}: edit_files", f"median {statistics.median(times[crop_to_map]):.2f} s ({runs})")
    table.figures.update(crop_s=times[True], whole_s=times[False])
    return table


def add_arguments(parser) -> None:
    parser.add_argument("--size", default="4000x3000")
    parser.add_argument("--edit", type=int, default=500, help="side of the square edit, in pixels")
    parser.add_argument("--repeats", type=int, default=3)


def run(args) -> Table:
    width, height = (int(side) for side in args.size.split("x"))
    return measure_crop(args.weights, width, height, args.edit, args.repeats)
