"""What making a map costs: map_prompt's CLIPSeg, map_depth's Depth Anything and the outpainting's fill, on one
picture size (a 1024x1024 photo by default), loaded from a weights folder on the serving device and dtype."""

import statistics
import time
from pathlib import Path

import numpy as np

from ...maps.estimators import DepthEstimator, TextSegmenter
from ...maps.fill import fill_unknown
from ...maps.outpaint import Extension
from ...tooling.pictures import photo
from ...weights.load import select_device
from ..measuring import PeakMemory, synchronised_seconds, weight_bytes
from .table import Table


def median_seconds(action, repeats: int) -> tuple[float, list[float]]:
    action()  # the first call pays for allocations and kernel choices
    runs = [synchronised_seconds(action) for _ in range(repeats)]
    return statistics.median(runs), runs


def measure_maps(weights: Path, width: int = 1024, height: int = 1024, phrases: int = 2, repeats: int = 3) -> Table:
    device, dtype = select_device()
    pixels = photo(width, height, seed=3)
    table = Table(f"{weights}, a {width}x{height} picture, on {device} ({str(dtype).removeprefix('torch.')})")
    started = time.perf_counter()
    segmenter = TextSegmenter.load(weights, device, dtype)
    depth = DepthEstimator.load(weights, device, dtype)
    table.add("load both models", f"{time.perf_counter() - started:.2f} s", load_s=time.perf_counter() - started)
    sizes = weight_bytes(segmenter.model) / 2**20, weight_bytes(depth.model) / 2**20
    table.add("their weights", f"CLIPSeg {sizes[0]:.0f} MiB, Depth Anything {sizes[1]:.0f} MiB",
              segmenter_mib=sizes[0], depth_mib=sizes[1])  # fmt: skip
    prompts = ["the sky", "water", "a person", "a tree", "a car", "a house", "a dog", "grass"][:phrases]
    memory = PeakMemory(device)
    for label, key, action in (
        (f"map_prompt, {phrases} phrase(s)", "map_prompt", lambda: segmenter.probabilities(pixels, prompts)),
        ("map_depth", "map_depth", lambda: depth.nearness(pixels)),
    ):
        memory.reset()
        median, runs = median_seconds(action, repeats)
        peak = memory.peak_bytes() / 2**20
        text = f"median {median:.3f} s ({', '.join(f'{run:.3f}' for run in runs)}), peak {peak:.0f} MiB"
        table.add(label, text, **{f"{key}_s": runs, f"{key}_peak_mib": peak})
    extension = Extension(width // 4, width // 4, 0, 0, width, height)
    median, runs = median_seconds(lambda: extension.canvas_pixels(pixels, seed=0), repeats)
    canvas = "x".join(str(side) for side in extension.canvas_size)
    table.add(f"outpaint fill to {canvas}", f"median {median:.3f} s", outpaint_fill_s=runs)
    alpha = np.zeros((height, width), bool)
    alpha[: height // 2] = True
    median, runs = median_seconds(lambda: fill_unknown(pixels, alpha, seed=0), repeats)
    table.add("fill half the picture (transparency)", f"median {median:.3f} s", transparency_fill_s=runs)
    return table


def add_arguments(parser) -> None:
    parser.add_argument("--size", default="1024x1024", help="the picture's width x height")
    parser.add_argument("--phrases", type=int, default=2, help="map_prompt's phrases, 1 to 8")
    parser.add_argument("--repeats", type=int, default=3)


def run(args) -> Table:
    width, height = (int(side) for side in args.size.split("x"))
    return measure_maps(args.weights, width, height, args.phrases, args.repeats)
