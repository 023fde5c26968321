"""One edit from files to pictures: the single call predict.py makes."""

import logging
import time
from pathlib import Path

import torch

from . import imageio, maps, resources
from .fetch import LoraCache
from .inputs import EditOptions, LoraOptions
from .pipeline import DifferentialDiffusionPipeline, EditRequest, EditResult
from .sizing import WORKING_AREA
from .user_loras import use_loras

log = logging.getLogger(__name__)


def edit_files(
    pipeline: DifferentialDiffusionPipeline,
    image_path: Path,
    map_path: Path,
    options: EditOptions,
    *,
    loras: LoraOptions | None = None,
    lora_cache: LoraCache | None = None,
    allow_lora_paths: bool = False,
    working_area: int = WORKING_AREA,
    time_each_step: bool = False,
) -> EditResult:
    """Check the work fits, merge the request's LoRAs, read the picture and its change map, fit the map, and run
    the edit.

    A failure or cancellation (a BaseException) frees what the edit held; running out of memory becomes one
    line naming what to lower. allow_lora_paths lets local LoRA files through (the command line, never the
    server); working_area and time_each_step are for the benchmark.
    """
    width, height = imageio.picture_size(image_path, "image")
    resources.check_memory(pipeline, options.num_outputs, width, height, working_area)
    try:
        loras = loras or LoraOptions()
        edit_bytes = resources.estimate_peak_bytes(pipeline, options.num_outputs, width, height, working_area)
        lora_seconds = use_loras(pipeline, loras, lora_cache or LoraCache(), allow_lora_paths, edit_bytes)
        result = _read_and_edit(pipeline, image_path, map_path, options, working_area, time_each_step)
        if loras.loras:
            result.timings = {"loras": lora_seconds, **result.timings}
        return result
    except BaseException as error:
        resources.release_memory(error)
        if isinstance(error, resources.OUT_OF_MEMORY_ERRORS):
            raise resources.out_of_memory_error(options.num_outputs, width, height) from None
        raise
    finally:
        resources.trim_heap()


def _read_and_edit(
    pipeline: DifferentialDiffusionPipeline,
    image_path: Path,
    map_path: Path,
    options: EditOptions,
    working_area: int,
    time_each_step: bool,
) -> EditResult:
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
