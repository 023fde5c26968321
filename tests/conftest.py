"""Shared fixtures: tiny random weights made once per test session, the pipeline loaded on them, and the tiers.

Tests are in three tiers: pure functions, the pipeline on tiny weights, and the predictor served by Cog's HTTP server.
The first two, unmarked, also get the `fast` marker, which `bash scripts/test -m fast` runs between edits; tests that
start servers or other processes are marked `server` (or `slow`, `soak`, `cuda`) and run in the whole suite.
"""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(os.cpu_count() or 1)

NOT_FAST = ("server", "slow", "soak", "cuda")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(marker) for marker in NOT_FAST):
            item.add_marker(pytest.mark.fast)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    from models.tooling.random_weights.build import write_test_weights

    folder = tmp_path_factory.mktemp("weights") / "model-cache"
    write_test_weights(folder)
    return folder


@pytest.fixture(scope="session")
def hub(tmp_path_factory, tiny_weights):
    """Repositories laid out like the three real ones, made from the tiny weights, and a fetcher reading them."""
    from tests.support.hub import FakeHub, build_hub

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
    from models.weights.load import load_pipeline

    return load_pipeline(tiny_weights)
