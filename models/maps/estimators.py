"""The two models that make maps from the picture, loaded in setup and run only when a request asks:

- map_prompt's CLIPSeg (`CIDAS/clipseg-rd64-refined`): a soft map of where a few words are in the picture. Input as
  CLIPSegProcessor prepares it (resize to its square size, bilinear; scale to 0-1; normalise).
- map_depth's Depth Anything V2 Small: relative inverse depth (large = near) for every pixel. Input as
  DPTImageProcessor prepares it with Depth Anything's settings (the shorter side to its size keeping the aspect
  ratio, each side a multiple of the patch size; bicubic; scale to 0-1; normalise).

The inputs are made on the device from the picture as a tensor, with the settings read from each model's own
preprocessor_config.json, instead of moving the picture through PIL on the CPU; the models and the tokenizer are
transformers' own.
"""

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPSegForImageSegmentation, CLIPTokenizer, DepthAnythingForDepthEstimation

from ..weights.sources import DEPTH_FOLDER, SEGMENTATION_FOLDER

log = logging.getLogger(__name__)


def load_model(model_class: type, folder: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, dict]:
    """A transformers model from its folder's safetensors straight onto the device, and its preprocessor config."""
    model = model_class.from_pretrained(
        folder, torch_dtype=dtype, device_map=str(device), use_safetensors=True, local_files_only=True
    )
    return model.eval(), json.loads((folder / "preprocessor_config.json").read_text("utf-8"))


MAX_ASPECT = 4
"""The longer side is run at most this many times the shorter one (a panorama is squeezed, not run at 20x)."""


def normalised_pixels(
    pixels: np.ndarray, size: tuple[int, int], mode: str, mean: list[float], std: list[float], device: torch.device
) -> torch.Tensor:
    """RGB uint8 (H, W, 3) as a model's (1, 3, *size) float32 input: resized (antialiased), scaled to 0-1,
    normalised."""
    image = torch.as_tensor(pixels, device=device).permute(2, 0, 1)[None].float() / 255.0
    image = F.interpolate(image, size=size, mode=mode, antialias=True, align_corners=False).clamp(0.0, 1.0)
    mean_tensor, std_tensor = (torch.tensor(values, device=device).view(1, 3, 1, 1) for values in (mean, std))
    return (image - mean_tensor) / std_tensor


def input_size(height: int, width: int, side: int, multiple: int) -> tuple[int, int]:
    """The shorter side at `side`, the aspect kept (up to MAX_ASPECT), each side rounded to a multiple."""
    scale = side / min(height, width)
    long_limit = side * MAX_ASPECT
    sides = [min(round(length * scale), long_limit) for length in (height, width)]
    return tuple(max(multiple, round(length / multiple) * multiple) for length in sides)


class DepthEstimator:
    """Relative nearness (inverse depth) of every pixel, at the model's resolution."""

    def __init__(self, model: DepthAnythingForDepthEstimation, preprocessing: dict):
        self.model = model
        size = preprocessing.get("size", 518)
        self.side = min(size["height"], size["width"]) if isinstance(size, dict) else int(size)
        self.multiple = int(preprocessing.get("ensure_multiple_of", 14))
        self.mean, self.std = preprocessing["image_mean"], preprocessing["image_std"]

    @classmethod
    def load(cls, folder: Path, device: torch.device, dtype: torch.dtype) -> "DepthEstimator":
        started = time.perf_counter()
        model, preprocessing = load_model(DepthAnythingForDepthEstimation, folder / DEPTH_FOLDER, device, dtype)
        log.info("loaded map_depth's Depth Anything in %.2fs", time.perf_counter() - started)
        return cls(model, preprocessing)

    @torch.inference_mode()
    def nearness(self, pixels: np.ndarray) -> torch.Tensor:
        """(h, w) float32 relative inverse depth (large = near) for RGB uint8 pixels (H, W, 3)."""
        size = input_size(*pixels.shape[:2], self.side, self.multiple)
        image = normalised_pixels(pixels, size, "bicubic", self.mean, self.std, self.model.device)
        depth = self.model(pixel_values=image.to(self.model.dtype)).predicted_depth
        return depth.float().reshape(depth.shape[-2:]).cpu()


class TextSegmenter:
    """Probabilities, per prompt and pixel, that the pixel shows what the prompt names."""

    def __init__(self, model: CLIPSegForImageSegmentation, tokenizer: CLIPTokenizer, preprocessing: dict):
        self.model = model
        self.tokenizer = tokenizer
        size = preprocessing.get("size", 352)
        self.size = (size["height"], size["width"]) if isinstance(size, dict) else (int(size), int(size))
        self.mean, self.std = preprocessing["image_mean"], preprocessing["image_std"]

    @classmethod
    def load(cls, folder: Path, device: torch.device, dtype: torch.dtype) -> "TextSegmenter":
        started = time.perf_counter()
        model, preprocessing = load_model(CLIPSegForImageSegmentation, folder / SEGMENTATION_FOLDER, device, dtype)
        tokenizer = CLIPTokenizer.from_pretrained(folder / SEGMENTATION_FOLDER, local_files_only=True)
        log.info("loaded map_prompt's CLIPSeg in %.2fs", time.perf_counter() - started)
        return cls(model, tokenizer, preprocessing)

    @torch.inference_mode()
    def probabilities(self, pixels: np.ndarray, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), h, w) float32 in [0, 1] at the model's resolution, for RGB uint8 pixels (H, W, 3)."""
        device, dtype = self.model.device, self.model.dtype
        image = normalised_pixels(pixels, self.size, "bilinear", self.mean, self.std, device)
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(device)
        logits = self.model(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            pixel_values=image.to(dtype).expand(len(prompts), -1, -1, -1),
        ).logits
        return torch.sigmoid(logits.float()).reshape(len(prompts), *logits.shape[-2:]).cpu()


def resized_probabilities(probabilities: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Maps at the model's resolution brought to the picture's size (bilinear: the model's grid is coarse)."""
    return F.interpolate(probabilities[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
