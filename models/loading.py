"""Loading the model folder: the only code that reads weight files."""

import logging
import os
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .acceleration import speed_up
from .errors import WeightsError
from .pipeline import DifferentialDiffusionPipeline

log = logging.getLogger(__name__)

DEFAULT_MODEL_CACHE = "model-cache"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


def model_cache() -> Path:
    """The weights folder: $MODEL_CACHE, else ./model-cache."""
    return Path(os.environ.get("MODEL_CACHE", DEFAULT_MODEL_CACHE))


def select_device() -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16 when there is a GPU; else CPU in fp32 (bf16 is ~5x slower on CPUs without native bf16)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def check_folder(folder: Path) -> None:
    """Refuse a missing folder, or one holding pickle files, before anything is read."""
    if not (folder / "model_index.json").is_file():
        raise WeightsError(
            f"no model weights in {folder.resolve()}: run `python scripts/download-weights` first"
            " (or set MODEL_CACHE to a folder it wrote)"
        )
    unsafe = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if unsafe:
        raise WeightsError(f"refusing to load pickle files from {folder}: {', '.join(unsafe)}")


def load_pipeline(
    folder: Path | None = None, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> DifferentialDiffusionPipeline:
    """Load every component from safetensors straight into the target dtype, logging each one's time."""
    folder = Path(folder) if folder is not None else model_cache()
    if device is None or dtype is None:
        device, dtype = select_device()
    check_folder(folder)
    started = time.perf_counter()
    models = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
    }
    components: dict = {}
    for name, model_class in models.items():
        loaded_at = time.perf_counter()
        model = model_class.from_pretrained(
            folder, subfolder=name, torch_dtype=dtype, use_safetensors=True, local_files_only=True
        )
        components[name] = model.to(device).eval().requires_grad_(False)
        log.info("loaded %s in %.2fs", name, time.perf_counter() - loaded_at)
    for name in ("tokenizer", "tokenizer_2"):
        components[name] = CLIPTokenizer.from_pretrained(folder, subfolder=name, local_files_only=True)
    components["scheduler"] = LCMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    sdxl = StableDiffusionXLImg2ImgPipeline(**components, force_zeros_for_empty_prompt=True)
    sdxl.set_progress_bar_config(disable=True)
    log.info(
        "loaded %s on %s (%s) in %.2fs",
        folder,
        device,
        str(dtype).removeprefix("torch."),
        time.perf_counter() - started,
    )
    pipeline = DifferentialDiffusionPipeline(sdxl, device, dtype)
    speed_up(pipeline, compile_cache=folder / "torch-compile-cache")
    return pipeline
