"""The safety checker: the CompVis `StableDiffusionSafetyChecker` Replicate's SDXL uses, run on what is returned.

Its inputs are prepared here, on the device, from the pictures as tensors: CLIPImageProcessor's steps (shortest
side to the processor's size, bicubic; centre crop; scale to 0-1; normalise with the processor's mean and std), read
from its own preprocessor_config.json, without moving every picture through PIL on the CPU. The decision is
diffusers' own (`forward`: CLIP image embedding against 17 concept and 3 special-care embeddings with thresholds).
"""

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.utils import logging as diffusers_logging

from .weights.sources import SAFETY_FILES

log = logging.getLogger(__name__)

# diffusers logs that flagged pictures are replaced by black ones: not what happens here (they are left out).
diffusers_logging.get_logger("diffusers.pipelines.stable_diffusion.safety_checker").setLevel(logging.ERROR)


def _side(value: int | dict, key: str) -> int:
    """A size from a preprocessor config: a number (CompVis's file, the older format) or a dict of sides."""
    return int(value[key]) if isinstance(value, dict) else int(value)


class SafetyChecker:
    """Flags pictures the CompVis checker finds NSFW, a batch at a time, in the model dtype on the device."""

    def __init__(self, model: StableDiffusionSafetyChecker, preprocessing: dict, device: torch.device):
        self.model = model
        self.device = device
        self.size = _side(preprocessing.get("size", 224), "shortest_edge")
        crop = preprocessing.get("crop_size", self.size)
        self.crop = (_side(crop, "height"), _side(crop, "width"))
        self.mean = torch.tensor(preprocessing["image_mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocessing["image_std"], device=device).view(1, 3, 1, 1)

    @classmethod
    def load(
        cls, folder: Path, device: torch.device, dtype: torch.dtype, compute_device: torch.device | None = None
    ) -> "SafetyChecker":
        """Load it onto device; its inputs are made on compute_device (the GPU of the low-memory mode, whose
        models live on the CPU between uses), by default the same."""
        started = time.perf_counter()
        model = StableDiffusionSafetyChecker.from_pretrained(
            folder,
            subfolder=Path(SAFETY_FILES["model.safetensors"]).parent.as_posix(),
            torch_dtype="auto",  # the file's own (float32 as published): the cast to dtype runs on the device
            device_map=str(device),
            use_safetensors=True,
            local_files_only=True,
        )
        model = torch.nn.Module.to(model, device, dtype).eval().requires_grad_(False)
        preprocessing = json.loads((folder / SAFETY_FILES["preprocessor_config.json"]).read_text(encoding="utf-8"))
        log.info("loaded safety_checker in %.2fs", time.perf_counter() - started)
        return cls(model, preprocessing, compute_device or device)

    def clip_input(self, pictures: list[np.ndarray]) -> torch.Tensor:
        """The checker's input for RGB uint8 pictures of any sizes: (N, 3, crop height, crop width)."""
        prepared = []
        for picture in pictures:
            pixels = torch.as_tensor(picture, device=self.device).permute(2, 0, 1)[None].float() / 255.0
            height, width = pixels.shape[-2:]
            scale = self.size / min(height, width)
            size = (max(self.crop[0], round(height * scale)), max(self.crop[1], round(width * scale)))
            pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True).clamp(0.0, 1.0)
            top, left = (size[0] - self.crop[0]) // 2, (size[1] - self.crop[1]) // 2
            prepared.append(pixels[:, :, top : top + self.crop[0], left : left + self.crop[1]])
        return ((torch.cat(prepared) - self.mean) / self.std).to(self.model.dtype)

    @torch.inference_mode()
    def flags(self, pictures: list[np.ndarray]) -> list[bool]:
        """Whether each picture is flagged, from one run of the checker on the whole batch."""
        if not pictures:
            return []
        _, flagged = self.model(clip_input=self.clip_input(pictures), images=torch.zeros(len(pictures), 1))
        return [bool(flag) for flag in flagged]
