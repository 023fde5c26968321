"""One edit from files to pictures: the single call predict.py makes."""

import logging
import time
from pathlib import Path

import torch

from . import imageio, maps
from .inputs import EditOptions
from .pipeline import DifferentialDiffusionPipeline, EditRequest, EditResult
from .sizing import WORKING_AREA

log = logging.getLogger(__name__)


def edit_files(
    pipeline: DifferentialDiffusionPipeline,
    image_path: Path,
    map_path: Path,
    options: EditOptions,
    *,
    working_area: int = WORKING_AREA,
    time_each_step: bool = False,
) -> EditResult:
    """Read the picture and its change map, fit the map to the picture, and run the edit.

    working_area and time_each_step are for the benchmark; serving keeps the defaults.
    """
    started = time.perf_counter()
    image = imageio.read_image(image_path, "image")
    change_map = torch.from_numpy(imageio.read_map(map_path, "map"))
    height, width = image.shape[:2]
    if change_map.shape != (height, width):
        log.warning("map: %dx%d resized to the image's %dx%d", change_map.shape[1], change_map.shape[0], width, height)
    change_map = maps.fit_to_image(change_map, width, height)
    change_map = maps.apply_strength(change_map, options.strength, options.invert_map)
    log.info("seed: %d", options.seed)
    request = EditRequest(
        image=image,
        change_map=change_map.numpy(),
        prompt=options.prompt,
        negative_prompt=options.negative_prompt,
        steps=options.steps,
        guidance_scale=options.guidance_scale,
        num_outputs=options.num_outputs,
        seed=options.seed,
        working_area=working_area,
    )
    decode_seconds = time.perf_counter() - started
    result = pipeline.edit(request, time_each_step)
    result.timings = {"decode_inputs": decode_seconds, **result.timings}
    return result
