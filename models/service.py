"""The serving path: from a validated request to pictures written, the one path predict.py, the command line and the
benchmark all run.

A prediction reads the files, merges the request's LoRAs, edits under the heap policy's settings for an edit, screens
the outputs, writes them with the input's metadata and hands the heap's free pages back. Its timings come back as data
(`Prediction.timings`), stage by stage, and are logged in one line.
"""

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from . import heap
from .editor import edit_files
from .inputs import Request
from .loras.cache import LoraCache
from .loras.messages import redact
from .pictures.write import encode_map, map_path_beside, numbered_paths, write_pictures
from .pipeline import DifferentialDiffusionPipeline, StepListener
from .sizing import WORKING_AREA
from .validation import lora_source
from .weights.load import load_pipeline

log = logging.getLogger(__name__)

OutputPaths = Callable[[int, str], list[Path]]
"""Where the outputs go, given how many there are and their format."""


@dataclass(frozen=True)
class Prediction:
    """What a prediction wrote (the pictures, then the map when return_map asked for it), the seed it used and the
    seconds of each stage ("total" is the whole run)."""

    paths: list[Path]
    seed: int
    timings: dict[str, float]


class EditService:
    """A loaded pipeline and the LoRA cache, serving one request at a time."""

    def __init__(
        self,
        pipeline: DifferentialDiffusionPipeline,
        lora_cache: LoraCache,
        allow_lora_paths: bool = False,
        trained_lora: str = "",
    ) -> None:
        self.pipeline = pipeline
        self.lora_cache = lora_cache
        self.allow_lora_paths = allow_lora_paths
        """Local LoRA files for the command line; a server takes none."""
        self.trained_lora = trained_lora
        """A trained version's LoRA (Replicate sets $COG_WEIGHTS to its training's .tar): what lora_weights means
        when a request leaves it empty."""

    @classmethod
    def start(
        cls,
        weights: Path | None = None,
        *,
        lora_cache: LoraCache | None = None,
        allow_lora_paths: bool = False,
        trained_lora: str | None = None,
        **load_options,
    ) -> "EditService":
        """Apply the heap policy, then load the weights (load_pipeline's options: device, dtype, low_vram, ...).
        trained_lora: the LoRA a trained version serves by default (Cog's setup weights)."""
        started = time.perf_counter()
        log.info("heap policy: %s", heap.configure())
        trained = lora_source("weights", trained_lora)
        if trained:
            log.info("this version was trained: its LoRA %s is used when lora_weights is empty", redact(trained))
        pipeline = load_pipeline(weights, **load_options)
        service = cls(pipeline, lora_cache or LoraCache(), allow_lora_paths, trained)
        log.info("setup took %.2fs", time.perf_counter() - started)
        return service

    def run(
        self,
        request: Request,
        output_paths: OutputPaths,
        *,
        working_area: int = WORKING_AREA,
        time_each_step: bool = False,
        on_step: StepListener | None = None,
    ) -> Prediction:
        """Edit, screen and write one request's pictures; the heap's free pages go back afterwards, however it ends.

        working_area and time_each_step are for the benchmark; on_step follows the denoising steps (progress bars).
        """
        started = time.perf_counter()
        try:
            loras = request.loras
            if self.trained_lora and not loras.lora_weights:
                loras = replace(loras, lora_weights=self.trained_lora)
            result = edit_files(
                self.pipeline,
                request.image,
                request.map,
                request.edit,
                loras=loras,
                lora_cache=self.lora_cache,
                allow_lora_paths=self.allow_lora_paths,
                working_area=working_area,
                time_each_step=time_each_step,
                on_step=on_step,
            )
            encoding = time.perf_counter()
            output = request.output
            paths = output_paths(len(result.images), output.output_format)
            write_pictures(result.images, paths, output.output_format, output.output_quality, result.metadata)
            if output.return_map and result.change_map is not None:
                paths.append(map_path_beside(paths[0]))
                paths[-1].write_bytes(encode_map(result.change_map.numpy()))
            result.timings["encode_outputs"] = time.perf_counter() - encoding
        finally:
            heap.trim()
        timings = {**result.timings, "total": time.perf_counter() - started}
        stages = ", ".join(f"{stage} {seconds:.2f}s" for stage, seconds in result.timings.items())
        log.info("prediction took %.2fs (%s)", timings["total"], stages)
        return Prediction(paths, request.edit.seed, timings)

    def run_into(self, request: Request, folder: Path) -> Prediction:
        """run() with the outputs named out-N.<format> in a folder emptied first: the predictor's, where the outputs of
        an earlier request never linger."""
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return self.run(request, numbered_paths(folder))
