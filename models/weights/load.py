"""Loading the model folder: the only code that reads weight files.

The folder must match its manifest (models/weights/manifest.py) before anything is read; a missing or damaged folder is
built first (models/weights/build.py), unless the Hub is out of reach. Each component is built on the meta device and
its safetensors tensors are loaded straight onto the target device (diffusers and transformers from_pretrained with
a device_map), then cast to the target dtype there: no random initialisation. The Flash-SDXL LoRA is fused into the
UNet's weights by models/loras/merge.py, so peft is never imported.
"""

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionXLImg2ImgPipeline,
    UNet2DConditionModel,
)
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .. import settings
from ..acceleration import compile_and_warm_up, save_memory, speed_up
from ..accelerators import ACCELERATORS, DEFAULT_ACCELERATOR, Accelerator
from ..errors import DownloadError, InputError, WeightsError
from ..loras.formats import LoraError, read_lora
from ..loras.merge import fuse
from ..loras.names import Targets
from ..maps.estimators import DepthEstimator, TextSegmenter
from ..pipeline import DifferentialDiffusionPipeline
from ..safety import SafetyChecker
from .build import build_weights
from .manifest import Manifest, check_against_manifest
from .sources import DOWNLOAD_COMMAND, PLACED_FILES, PLACED_NAMES

log = logging.getLogger(__name__)

MODELS = {
    "unet": UNet2DConditionModel,
    "vae": AutoencoderKL,
    "text_encoder": CLIPTextModel,
    "text_encoder_2": CLIPTextModelWithProjection,
}

LOADED_STAGES = (*MODELS, "safety_checker", "map_models")
"""What load_pipeline tells on_loaded about, in order (the command line's loading bar counts them)."""


def compile_cache(folder: Path) -> Path:
    """torch.compile's cache, next to the weights folder rather than in it: the folder holds only manifest files."""
    folder = folder.absolute()
    return folder.with_name(f"{folder.name}.compile-cache")


DEVICES = ("auto", "cuda", "cpu")

LOW_VRAM_EDIT_BYTES = 3 * 2**30
"""GPU memory a one-megapixel edit needs beside the weights (the VAE decode's activations, mostly): with less free
than the weights plus this, setup chooses the low-memory mode by itself."""


def select_device(requested: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA when there is a GPU, in bf16 (fp16 on GPUs older than Ampere, which lack bf16: the fp16-fix VAE runs in
    both); else the CPU in fp32 (bf16 is ~5x slower on CPUs without native bf16)."""
    if requested not in DEVICES:
        raise InputError(f"device: must be one of {', '.join(DEVICES)}, got {requested!r}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        raise InputError("device: cuda asked for, but PyTorch sees no CUDA GPU; use auto or cpu")
    return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def weights_bytes_on_device(manifest: Manifest) -> int:
    """The models' size in a 16-bit dtype on the GPU, from the manifest (the models beside the pipeline are stored in
    fp32)."""
    sizes = {name: record.size for name, record in manifest.files.items() if name.endswith(".safetensors")}
    float32 = {files["model.safetensors"] for files in PLACED_FILES.values()}
    return sum(size // 2 if name in float32 else size for name, size in sizes.items())


def choose_low_vram(device: torch.device, manifest: Manifest, requested: bool | None) -> bool:
    """The low-memory mode when asked for ($LOW_VRAM, --low-vram), or on a GPU with less free memory than the
    weights and a one-megapixel edit need."""
    if requested is not None:
        return requested
    if settings.enabled(settings.LOW_VRAM):
        return True
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    needed = weights_bytes_on_device(manifest) + LOW_VRAM_EDIT_BYTES
    if free < needed:
        log.warning("the GPU has %.1f GiB free, a normal load needs about %.1f GiB: low-memory mode", free / 2**30,
                    needed / 2**30)  # fmt: skip
        return True
    return False


def check_folder(folder: Path, hashes: bool | None = None) -> Manifest:
    """Refuse a missing folder, or one that fails its manifest, before anything is read.

    Sizes and the file list are always checked (milliseconds); sha256 of every byte only with hashes=True or
    $VERIFY_WEIGHTS=1, since scripts/download-weights already hashed them.
    """
    started = time.perf_counter()
    hashes = settings.enabled(settings.VERIFY_WEIGHTS) if hashes is None else hashes
    manifest = check_against_manifest(folder, hashes=hashes)
    log.info(
        "checked %d files against %s by %s in %.2fs: %s",
        len(manifest.files),
        folder / "manifest.json",
        "sha256" if hashes else "size",
        time.perf_counter() - started,
        manifest.describe(),
    )
    return manifest


def prepare_folder(folder: Path, build_missing: bool = True) -> Manifest:
    """The folder's manifest once it is complete: a missing or damaged folder is built first, as download-weights
    does, when the Hub (or $WEIGHTS_SNAPSHOTS) can be reached; otherwise one line naming the command to run."""
    try:
        manifest = check_folder(folder)
        for source, files in PLACED_FILES.items():
            lacking = [name for name in files.values() if name not in manifest.files]
            if lacking:
                raise WeightsError(
                    f"{folder.resolve()} has no {PLACED_NAMES[source]} ({lacking[0]}): run `{DOWNLOAD_COMMAND}`,"
                    " which fetches only what the folder lacks"
                )
        return manifest
    except WeightsError as problem:
        offline = settings.enabled(settings.HF_HUB_OFFLINE) and not settings.folder(settings.WEIGHTS_SNAPSHOTS)
        if not build_missing or offline:
            raise
        log.warning("%s", problem)
        log.info("building %s now, as scripts/download-weights does (about 8 GB from the Hub)", folder.absolute())
        try:
            build_weights(folder)
        except (DownloadError, OSError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise WeightsError(f"{problem} (building it here failed: {reason})") from None
    return check_folder(folder)


def stored_dtype(manifest: Manifest, target: torch.dtype) -> torch.dtype:
    """The dtype to read the tensors in: the files' own, so that the cast to the target runs on the device.

    from_pretrained casts each tensor on the CPU before moving it, tens of seconds for SDXL's 7 GB on a few CPU cores,
    where on a GPU it is milliseconds of memory traffic. Folders of mixed dtypes load in the target dtype.
    """
    stored = getattr(torch, manifest.dtype, None)
    return stored if isinstance(stored, torch.dtype) else target


def keeps_float32_modules(model_class: type) -> bool:
    """Models with modules that from_pretrained keeps in float32 must be loaded in the target dtype directly."""
    return bool(getattr(model_class, "_keep_in_fp32_modules", None))


def choose_accelerator(manifest: Manifest, folder: Path, requested: str | None) -> tuple[Accelerator, dict | None]:
    """The accelerator to fuse and its LoRA record: the one asked for (the argument, else $ACCELERATOR) among those
    the folder holds, else the one it was built with (its manifest's LoRA record says; Flash-SDXL when it does not,
    as in folders from before the choice)."""
    default = (manifest.lora or {}).get("accelerator", DEFAULT_ACCELERATOR)
    name = (requested or settings.ACCELERATOR.text() or default).strip().lower()
    if name not in ACCELERATORS:
        raise InputError(f"accelerator: must be one of {', '.join(ACCELERATORS)}, got {name!r}")
    accelerator = ACCELERATORS[name]
    if name == default:
        return accelerator, manifest.lora
    record = {"file": f"{accelerator.folder}/{accelerator.weight_name}", "scale": 1.0}
    if record["file"] not in manifest.files:
        raise WeightsError(
            f"{folder.resolve()} has no {accelerator.title} LoRA: run `{DOWNLOAD_COMMAND} --accelerator {name}`,"
            " which fetches only that"
        )
    return accelerator, record


def fuse_accelerator_lora(unet: torch.nn.Module, folder: Path, record: dict | None, dtype: torch.dtype) -> float:
    """Fuse the accelerator's LoRA (its record: file and scale) into the UNet, from the stored weights, rounding once
    to the target dtype; the seconds it took."""
    if record is None:
        return 0.0
    started = time.perf_counter()
    try:
        targets = Targets.of({"unet": unet})
        updates = read_lora(folder / record["file"], targets).updates
    except LoraError as error:
        raise WeightsError(f"{record['file']} in {folder.resolve()}: {error}") from None
    fuse(targets, updates, float(record["scale"]), dtype)
    seconds = time.perf_counter() - started
    log.info("fused %s (%d layers) in %.2fs", record["file"], len(updates), seconds)
    return seconds


def read_model(folder: Path, name: str, device: torch.device, dtype: torch.dtype, stored: torch.dtype) -> nn.Module:
    """One of MODELS from its safetensors, straight onto the device, in the files' own dtype (see stored_dtype)."""
    model_class = MODELS[name]
    return model_class.from_pretrained(
        folder,
        subfolder=name,
        torch_dtype=dtype if keeps_float32_modules(model_class) else stored,
        device_map=str(device),
        use_safetensors=True,
        local_files_only=True,
    )


def frozen_on(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model cast on the device, in eval mode, without gradients."""
    # nn.Module.to: ModelMixin.to warns about float32-kept modules on every cast, even when there are none.
    return nn.Module.to(model, device, dtype).eval().requires_grad_(False)


def load_base_models(
    folder: Path | None, device: torch.device, dtype: torch.dtype, build_missing: bool = True
) -> tuple[dict, Manifest]:
    """SDXL's own components, frozen on the device, without any accelerator LoRA fused: what a LoRA is trained on
    (models/training), so that it stacks on whichever accelerator serves it; the scheduler is Euler's, for the
    samples of base SDXL a training makes. Also the folder's manifest (its sources' commits)."""
    folder = Path(folder) if folder is not None else settings.model_cache()
    manifest = prepare_folder(folder, build_missing)
    started = time.perf_counter()
    stored = stored_dtype(manifest, dtype)
    components: dict = {name: frozen_on(read_model(folder, name, device, dtype, stored), device, dtype)
                        for name in MODELS}  # fmt: skip
    for name in ("tokenizer", "tokenizer_2"):
        components[name] = CLIPTokenizer.from_pretrained(folder, subfolder=name, local_files_only=True)
    scheduler = LCMScheduler.load_config(folder, subfolder="scheduler", local_files_only=True)
    components["scheduler"] = EulerDiscreteScheduler.from_config(scheduler, timestep_spacing="trailing")
    log.info("loaded SDXL's base models from %s on %s (%s) in %.2fs", folder, device,
             str(dtype).removeprefix("torch."), time.perf_counter() - started)  # fmt: skip
    return components, manifest


def load_pipeline(
    folder: Path | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    build_missing: bool = True,
    low_vram: bool | None = None,
    on_loaded: Callable[[str], None] | None = None,
    accelerator: str | None = None,
) -> DifferentialDiffusionPipeline:
    """Load every component from safetensors straight onto the device, in the target dtype, logging each one's time.

    build_missing: build a missing or damaged folder first, when the Hub can be reached. low_vram: the low-memory
    mode (None: as $LOW_VRAM says, or when the GPU lacks the memory); on a GPU the models then load on the CPU in
    fp16 (their stored dtype: no cast) and move to the GPU one at a time. on_loaded is told each component's name
    as it is loaded (progress bars). accelerator: the few-step LoRA to fuse among those the folder holds (None: as
    $ACCELERATOR says, else the one the folder was built with). The seconds of each stage are kept in the pipeline's
    setup_timings.
    """
    setup_started = time.perf_counter()
    folder = Path(folder) if folder is not None else settings.model_cache()
    if device is None or dtype is None:
        device, dtype = select_device()
    manifest = prepare_folder(folder, build_missing)
    accelerator, lora = choose_accelerator(manifest, folder, accelerator)
    timings = {"check_folder": time.perf_counter() - setup_started}
    offload = choose_low_vram(device, manifest, low_vram)
    if offload and device.type == "cuda":
        dtype = torch.float16
    load_device = torch.device("cpu") if offload else device
    stored = stored_dtype(manifest, dtype)
    started = time.perf_counter()
    components: dict = {}
    for name in MODELS:
        loaded_at = time.perf_counter()
        model = read_model(folder, name, load_device, dtype, stored)
        if name == "unet":
            timings["fuse_lora"] = fuse_accelerator_lora(model, folder, lora, dtype)
        components[name] = frozen_on(model, load_device, dtype)
        timings[name] = time.perf_counter() - loaded_at
        log.info("loaded %s in %.2fs", name, timings[name])
        if on_loaded is not None:
            on_loaded(name)
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
    pipeline.accelerator = accelerator
    default = (manifest.lora or {}).get("accelerator", DEFAULT_ACCELERATOR)
    lora_source = manifest.sources.get("lora" if accelerator.name == default else accelerator.name)
    origin = f" ({lora_source['repo']} at {lora_source.get('commit', lora_source['revision'])})" if lora_source else ""
    log.info("accelerator: %s%s, licence %s", pipeline.accelerator.title, origin, pipeline.accelerator.licence)
    stage_started = time.perf_counter()
    pipeline.safety = SafetyChecker.load(folder, load_device, dtype, device)
    timings["safety_checker"] = time.perf_counter() - stage_started
    if on_loaded is not None:
        on_loaded("safety_checker")
    stage_started = time.perf_counter()
    # Small (0.15 and 0.025 billion parameters): on the GPU even in the low-memory mode, where a CPU would run them
    # in fp16 slowly.
    pipeline.segmenter = TextSegmenter.load(folder, device, dtype)
    pipeline.depth = DepthEstimator.load(folder, device, dtype)
    timings["map_models"] = time.perf_counter() - stage_started
    if on_loaded is not None:
        on_loaded("map_models")
    stage_started = time.perf_counter()
    speed_up(pipeline)
    timings["speed_up"] = time.perf_counter() - stage_started
    if offload:
        save_memory(pipeline)
        log.info(
            "low-memory mode: VAE tiling%s", ", models offloaded to the CPU between uses" * (device.type == "cuda")
        )
    elif settings.enabled(settings.COMPILE):
        stage_started = time.perf_counter()
        compile_and_warm_up(pipeline, compile_cache(folder))
        timings["compile_and_warm_up"] = time.perf_counter() - stage_started
    pipeline.setup_timings = {**timings, "total": time.perf_counter() - setup_started}
    return pipeline
