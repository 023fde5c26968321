"""Shared fixtures: tiny random weights made once per test session, and the pipeline loaded on them."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(os.cpu_count() or 1)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("weights") / "model-cache"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make-test-weights"), str(folder)], check=True)
    return folder


@pytest.fixture(scope="session")
def hub(tmp_path_factory, tiny_weights):
    """Repositories laid out like the three real ones, made from the tiny weights, and a fetcher reading them."""
    from tests.hub import FakeHub, build_hub

    root = tmp_path_factory.mktemp("hub")
    fake = FakeHub(root)
    fake.lora = build_hub(root, tiny_weights)
    fake.tiny = tiny_weights
    return fake


@pytest.fixture(scope="session")
def tiny_models(tiny_weights) -> dict:
    """The tiny UNet and text encoders as diffusers and transformers load them (no fast path, no LoRA fused)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return {
        "unet": UNet2DConditionModel.from_pretrained(tiny_weights, subfolder="unet").eval(),
        "text_encoder": CLIPTextModel.from_pretrained(tiny_weights, subfolder="text_encoder").eval(),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(tiny_weights, subfolder="text_encoder_2").eval(),
    }


@pytest.fixture(scope="session")
def pipeline(tiny_weights):
    from models.loading import load_pipeline

    return load_pipeline(tiny_weights)


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth test picture with texture: gradients plus noise, RGB uint8 (H, W, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=2) * 200
    return np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
