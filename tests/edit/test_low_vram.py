"""The low-memory mode: chosen when asked for or when the GPU lacks room; VAE tiling tested here (model offload needs
a GPU: scripts/gpu-check runs it under an emulated 8 GB card); fp16 on GPUs without bf16."""

import numpy as np
import pytest
import torch

from models.pipeline import EditRequest
from models.tooling.pictures import photo
from models.weights import load as loading
from models.weights.load import choose_low_vram, load_pipeline, select_device, weights_bytes_on_device
from models.weights.manifest import read_manifest


@pytest.fixture(scope="module")
def low_vram_pipeline(tiny_weights):
    return load_pipeline(tiny_weights, torch.device("cpu"), torch.float32, low_vram=True)


def test_tiling_keeps_kept_pixels_exact_and_changes_the_generated_ones_within_a_bound(pipeline, low_vram_pipeline):
    """The VAE in overlapping 512-pixel tiles is not exact: on the tiny random VAE the generated half moves by 6.8 of
    255 on average (up to ~200 at tile seams, which a trained VAE blends far better); kept pixels do not move."""
    assert low_vram_pipeline.vae.use_tiling and low_vram_pipeline.vae.tile_sample_min_size == 512
    assert not pipeline.vae.use_tiling
    image = photo(1024, 1024, seed=1)
    change_map = np.zeros((1024, 1024), np.float32)
    change_map[:, 512:] = 1.0
    request = EditRequest(image=image, change_map=change_map, prompt="a red boat", seed=3)
    whole = pipeline.edit(request).images[0].astype(int)
    tiled = low_vram_pipeline.edit(request).images[0].astype(int)
    difference = np.abs(whole - tiled)
    assert (difference[:, :480] == 0).all()
    assert 0 < difference[:, 600:].mean() < 12


def test_the_mode_is_chosen_when_asked_or_when_the_gpu_lacks_room(tiny_weights, monkeypatch):
    manifest = read_manifest(tiny_weights)
    gpu = torch.device("cuda")
    needed = weights_bytes_on_device(manifest) + loading.LOW_VRAM_EDIT_BYTES
    monkeypatch.delenv("LOW_VRAM", raising=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (needed - 1, 8 * 2**30))
    assert choose_low_vram(gpu, manifest, None) is True
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (needed + 1, 80 * 2**30))
    assert choose_low_vram(gpu, manifest, None) is False
    assert (
        choose_low_vram(gpu, manifest, True) is True and choose_low_vram(torch.device("cpu"), manifest, None) is False
    )
    monkeypatch.setenv("LOW_VRAM", "1")
    assert choose_low_vram(torch.device("cpu"), manifest, None) is True


def test_gpus_without_bf16_run_in_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert select_device("auto") == (torch.device("cuda"), torch.float16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert select_device("cuda") == (torch.device("cuda"), torch.bfloat16)
    assert select_device("cpu") == (torch.device("cpu"), torch.float32)
