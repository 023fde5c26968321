"""One edit from files to pictures: the single call predict.py makes."""

import logging
import math
import time
from pathlib import Path

import numpy as np

from . import cropping, heap, memory
from .errors import SafetyError
from .inputs import EditOptions, LoraOptions
from .limits import GUIDANCE_WARNING
from .loras.cache import LoraCache
from .loras.request import use_loras
from .maps import sources
from .maps.outpaint import Extension
from .pictures.read import picture_size, read_picture
from .pipeline import DifferentialDiffusionPipeline, EditRequest, EditResult, StepListener
from .sizing import WORKING_AREA

log = logging.getLogger(__name__)


def edit_files(
    pipeline: DifferentialDiffusionPipeline,
    image_path: Path,
    map_path: Path | None,
    options: EditOptions,
    *,
    loras: LoraOptions | None = None,
    lora_cache: LoraCache | None = None,
    allow_lora_paths: bool = False,
    working_area: int = WORKING_AREA,
    time_each_step: bool = False,
    on_step: StepListener | None = None,
) -> EditResult:
    """Check the work fits, merge the request's LoRAs, read the picture, make its change map (models/maps/sources.py:
    from the map file, words, depth, the picture's transparency or the outpainting), and run the edit.

    A failure or cancellation (a BaseException) frees what the edit held; running out of memory becomes one
    line naming what to lower. allow_lora_paths lets local LoRA files through (the command line, never the
    server); on_step follows the denoising steps (progress bars); working_area and time_each_step are for the
    benchmark. Reading the files and the edit run under the heap policy's settings for an edit; the LoRA merge,
    whose copies outlive it, does not.
    """
    width, height = picture_size(image_path, "image")
    extension = sources.extension_of(options, width, height)
    width, height = extension.canvas_size if extension is not None else (width, height)
    map_pixels = math.prod(picture_size(map_path, "map")) if map_path is not None else 0
    memory.check_fits(pipeline, options.num_outputs, width, height, working_area, map_pixels)
    try:
        loras = loras or LoraOptions.from_values({})
        edit_bytes = memory.estimate_peak_bytes(pipeline, options.num_outputs, width, height, working_area, map_pixels)
        lora_seconds = use_loras(pipeline, loras, lora_cache or LoraCache(), allow_lora_paths, edit_bytes)
        with heap.for_edit():
            result = _read_and_edit(
                pipeline, image_path, map_path, options, extension, working_area, time_each_step, on_step
            )
        if not options.disable_safety_checker:
            screen(pipeline, result)
        if loras.loras:
            result.timings = {"loras": lora_seconds, **result.timings}
        return result
    except BaseException as error:
        memory.release(error)
        if isinstance(error, memory.OUT_OF_MEMORY_ERRORS):
            raise memory.out_of_memory_error(options.num_outputs, width, height) from None
        raise
    finally:
        pipeline.offload()


def _read_and_edit(
    pipeline: DifferentialDiffusionPipeline,
    image_path: Path,
    map_path: Path | None,
    options: EditOptions,
    extension: Extension | None,
    working_area: int,
    time_each_step: bool,
    on_step: StepListener | None,
) -> EditResult:
    started = time.perf_counter()
    output_size = extension.canvas_size if extension is not None else None
    picture = read_picture(image_path, "image", options.keep_location, output_size)
    if not picture.colour_space.is_srgb:
        log.info("image: %s; the model sees sRGB, the outputs keep this profile", picture.colour_space.description)
    prepared = sources.prepare(picture, map_path, options, extension, pipeline.segmenter, pipeline.depth)
    pixels, change_map = prepared.pixels, prepared.change_map
    height, width = change_map.shape
    crop = cropping.choose_crop(change_map, working_area) if options.crop_to_map else None
    image, region = pixels, change_map
    if crop is not None:
        log.info(
            "crop: editing %dx%d at (%d, %d) of %dx%d, %.1fx the whole picture's detail",
            crop.width, crop.height, crop.left, crop.top, width, height, crop.gain,
        )  # fmt: skip
        image = pixels[crop.top : crop.bottom, crop.left : crop.right]
        region = change_map[crop.top : crop.bottom, crop.left : crop.right]
    log.info("seed: %d", options.seed)
    accelerator = pipeline.accelerator
    if options.guidance_scale > GUIDANCE_WARNING:
        log.warning("guidance_scale %g: %s is trained without guidance; high scales burn", options.guidance_scale,
                    accelerator.title)  # fmt: skip
    if options.steps not in accelerator.trained_steps:
        log.warning("steps %d: %s is made for %s steps; other counts give softer or noisier pictures", options.steps,
                    accelerator.title, accelerator.trained_for)  # fmt: skip
    request = EditRequest(
        image=np.ascontiguousarray(image),
        change_map=region.contiguous().numpy(),
        prompt=options.prompt,
        negative_prompt=options.negative_prompt,
        steps=options.steps,
        guidance_scale=options.guidance_scale,
        num_outputs=options.num_outputs,
        seed=options.seed,
        working_area=crop.working_area if crop is not None else working_area,
        colour_space=picture.colour_space,
    )
    decode_seconds = time.perf_counter() - started - sum(prepared.timings.values())  # the map models' apart
    result = pipeline.edit(request, time_each_step, on_step)
    result.metadata = picture.metadata
    result.change_map = change_map
    if crop is not None:
        result.crop_images = result.images
        result.images = [paste(pixels, edited, crop) for edited in result.images]
    result.timings = {"decode_inputs": decode_seconds, **prepared.timings, **result.timings}
    return result


def screen(pipeline: DifferentialDiffusionPipeline, result: EditResult) -> None:
    """Leave out the outputs the safety checker flags, checking each one as returned and, when the edit was made on
    a crop, the crop at its own resolution too (a small edit is invisible to a 224-pixel look at a large picture).
    One run of the checker on the whole batch; nothing to check when nothing was generated."""
    if pipeline.safety is None or not result.generated:
        return
    started = time.perf_counter()
    crops = result.crop_images or []
    flags = pipeline.safety.flags(result.images + crops)
    count = len(result.images)
    flagged = [flags[index] or (bool(crops) and flags[count + index]) for index in range(count)]
    result.timings["safety_check"] = time.perf_counter() - started
    if not any(flagged):
        return
    if all(flagged):
        raise SafetyError(
            f"the safety checker flagged {'the output' if count == 1 else f'all {count} outputs'} as possibly NSFW;"
            " try another prompt, seed or map (API callers can set disable_safety_checker)"
        )
    log.warning("safety checker: %d of %d outputs flagged as possibly NSFW and left out", sum(flagged), count)
    result.images = [image for image, bad in zip(result.images, flagged, strict=True) if not bad]
    if crops:
        result.crop_images = [image for image, bad in zip(crops, flagged, strict=True) if not bad]


def paste(pixels: np.ndarray, edited: np.ndarray, crop: cropping.Crop) -> np.ndarray:
    """The input's pixels with the crop's edited pixels in place."""
    whole = pixels.copy()
    whole[crop.top : crop.bottom, crop.left : crop.right] = edited
    return whole
