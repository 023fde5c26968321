"""One training from request to `.tar`: the single path that train.py (Cog) and scripts/train both call.

The output is laid out like Replicate's SDXL trainings, so that `lora_weights` (and Replicate's own SDXL) read it:
`lora.safetensors` (kohya layout with alphas), `embeddings.pti` and `special_params.json` when the token was trained,
`samples/step-NNNNN.webp` and `training.json` (inputs, base model commits, steps, losses, timings). Everything is made
in a temporary folder and the `.tar` appears under its final name only when whole: a failed or cancelled training
leaves nothing behind.
"""

import json
import logging
import os
import platform
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from safetensors.torch import save_file

from .. import settings
from ..errors import InputError, ProjectError
from ..loras.files import TRAINING_LORA_NAME
from ..maps.estimators import TextSegmenter
from ..weights.load import load_base_models, select_device
from .archive import read_archive
from .inputs import TrainingRequest
from .lora import lora_tensors
from .photos import prepare
from .tokens import NEW_TOKENS, write_token_files
from .trainer import Trained, Training

log = logging.getLogger(__name__)

OUTPUT_NAME = "trained_model.tar"
"""Replicate's SDXL trainings name their output so."""
RECORD_NAME = "training.json"


@dataclass(frozen=True)
class TrainingResult:
    tar: Path
    record: dict


def training_device(requested: str) -> tuple[torch.device, torch.dtype]:
    """The serving device rule, except that a GPU must have bf16: training in fp16 needs loss scaling, which this
    trainer does not do."""
    device, dtype = select_device(requested)
    if device.type == "cuda" and dtype != torch.bfloat16:
        raise InputError("device: training needs a GPU with bfloat16 (Ampere or newer), or the CPU")
    return device, dtype


def lora_metadata() -> dict[str, str]:
    """The file's header: only the base model's name (kohya's field, which UIs read to file a LoRA under SDXL). One
    field, because safetensors writes its fields in a hash map's random order, and the same seed must make the same
    bytes; rank, alpha (also a tensor per layer), steps and seed are in training.json."""
    return {"ss_base_model_version": "sdxl_base_v1-0"}


def record_of(request: TrainingRequest, trained: Trained, examples: list, manifest, device, dtype, seconds) -> dict:
    """training.json: what was asked, on what, and what came of it."""
    archive = {"bytes": request.input_images.stat().st_size, "pictures": len(examples)}
    sources = {name: {key: source.get(key) for key in ("repo", "revision", "commit")}
               for name, source in manifest.sources.items()}  # fmt: skip
    pictures = [
        {"name": example.name, "size": [example.size[1], example.size[0]], "prompt": example.prompt}
        | ({"subject_share": round(trained.subject_shares[index], 4)} if trained.subject_shares else {})
        for index, example in enumerate(examples)
    ]
    versions = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    return {
        "inputs": {**asdict(request.options), "input_images": archive},
        "base_model": sources,
        "accelerator": None,
        "steps": trained.progress.step,
        "final_loss": trained.progress.losses[-1] if trained.progress.losses else None,
        "loss_on_fixed_draw": trained.evaluation,
        "token": {"word": request.options.token, "tokens": "".join(NEW_TOKENS)} if trained.token_rows else None,
        "optimizer": trained.optimizer,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "pictures": pictures,
        "samples": sorted(trained.progress.samples),
        "seconds": {name: round(value, 2) for name, value in seconds.items()},
        "versions": versions,
    }


def write_tar(target: Path, folder: Path, trained: Trained, request: TrainingRequest, unet_config: dict) -> list[str]:
    """The files of the output in `folder`, then the .tar of them at `target`; the members' names."""
    save_file(lora_tensors(trained.adapters, unet_config), folder / TRAINING_LORA_NAME, lora_metadata())
    files = [folder / TRAINING_LORA_NAME]
    if trained.token_rows is not None:
        files += write_token_files(folder, request.options.token, trained.token_rows)
    for name, content in sorted(trained.progress.samples.items()):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
        files.append(folder / name)
    with tarfile.open(target, "w") as tar:
        for path in files:
            tar.add(path, arcname=str(path.relative_to(folder)))
    return [str(path.relative_to(folder)) for path in files]


def train_into(request: TrainingRequest, folder: Path) -> TrainingResult:
    """train_lora() into a folder emptied first, as OUTPUT_NAME: the Cog trainer's, where an earlier training's
    output never lingers."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return train_lora(request, folder / OUTPUT_NAME)


def train_lora(
    request: TrainingRequest,
    out: Path,
    weights: Path | None = None,
    device: str = "auto",
    on_step: Callable[[int, int], None] | None = None,
) -> TrainingResult:
    """Train a LoRA as the request asks and write its .tar at `out` (whole, or not at all)."""
    options = request.options
    started = time.perf_counter()
    log.info("training seed: %d", options.seed)
    target_device, dtype = training_device(device)
    partial = out.with_name(out.name + ".partial")
    try:
        with tempfile.TemporaryDirectory(prefix="training-") as work:
            work = Path(work)
            seconds = {}
            photos = read_archive(request.input_images, work / "photos")
            examples = prepare(photos, options.resolution, options.caption_prefix, options.token)
            seconds["read_photos"] = time.perf_counter() - started
            stage = time.perf_counter()
            folder = Path(weights) if weights is not None else settings.model_cache()
            components, manifest = load_base_models(folder, target_device, dtype)
            seconds["load"] = time.perf_counter() - stage
            stage = time.perf_counter()
            training = Training(components, options, examples, target_device, dtype)
            training.encode_latents()
            if options.mask_prompt:
                training.weigh_by_subject(TextSegmenter.load(folder, target_device, dtype))
            seconds["prepare"] = time.perf_counter() - stage
            trained = training.run(on_step)
            seconds.update(trained.progress.seconds)
            output = work / "output"
            output.mkdir()
            members = write_tar(partial, output, trained, request, dict(components["unet"].config))
            seconds["total"] = time.perf_counter() - started
            record = record_of(request, trained, examples, manifest, target_device, dtype, seconds)
            with tarfile.open(partial, "a") as tar:
                record_path = output / RECORD_NAME
                record_path.write_text(json.dumps(record, indent=2), encoding="utf-8")
                tar.add(record_path, arcname=RECORD_NAME)
            os.replace(partial, out)
    except BaseException as error:
        partial.unlink(missing_ok=True)
        if not isinstance(error, ProjectError):  # cancelled, interrupted or failed: say that nothing was left
            log.warning("training stopped (%s): nothing was written", type(error).__name__)
        raise
    log.info("wrote %s (%s, %s) in %.1fs", out, ", ".join([*members, RECORD_NAME]), f"{out.stat().st_size:,} bytes",
             time.perf_counter() - started)  # fmt: skip
    return TrainingResult(out, record)
