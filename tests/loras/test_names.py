"""models/loras/names.py: the names of every SDXL LoRA writer resolve to SDXL's layers, checked on full-size SDXL (its
architecture on the meta device) with each writer's complete key list, and the SGM block names against diffusers'
own single-file converter."""

from collections import Counter

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import save

from models.limits import MAX_LORA_HEADER_BYTES, MAX_LORA_TENSORS
from models.loras.formats import parse_lora
from models.loras.names import Targets, sgm_name, sgm_unet_paths
from models.weights.architecture import meta_models
from tests.support.writers import writers

WRITERS = tuple(writers({}))


@pytest.fixture(scope="module")
def sdxl() -> dict:
    return meta_models()


@pytest.fixture(scope="module")
def sdxl_targets(sdxl) -> Targets:
    return Targets.of(sdxl)


def test_the_writers_are_the_ones_the_issue_lists():
    assert len(WRITERS) >= 23


@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_s_full_size_file_is_read_whole_with_its_own_scale(sdxl, sdxl_targets, writer):
    written = writers(sdxl)[writer]()
    updates = parse_lora(written.tensors, written.header, sdxl_targets)
    assert Counter(update.component for update in updates) == written.layers
    assert {update.kind for update in updates} == written.kinds
    assert [update.scaling for update in updates if update.kind != "diff"] == pytest.approx(
        [written.scaling] * sum(update.kind != "diff" for update in updates)
    )
    assert all((update.magnitude is not None) == written.dora for update in updates)


def test_the_largest_writer_s_file_is_within_a_lora_s_limits(sdxl):
    """ComfyUI's LoraSave on the UNet and both text encoders, differences included: every SDXL parameter a file can
    change. A LyCORIS LoKr on the same layers stores at most twice the tensors per layer."""
    written = writers(sdxl)["comfyui-lorasave-text-encoders"]()
    content = save(written.tensors)
    header_bytes = int.from_bytes(content[:8], "little")
    assert 2 * len(written.tensors) < MAX_LORA_TENSORS
    assert 2 * header_bytes < MAX_LORA_HEADER_BYTES


def test_every_layer_of_sdxl_has_a_name_in_each_naming(sdxl, sdxl_targets):
    """Each linear and convolution layer of the UNet is reachable under diffusers' and SGM's names, flat and dotted."""
    blocks = sgm_unet_paths(sdxl["unet"].config)
    for name, module in sdxl["unet"].named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            sgm = sgm_name(name, blocks)
            assert sgm is not None, name
            for written in (f"lora_unet_{sgm.replace('.', '_')}", f"diffusion_model.{sgm}", f"unet.{name}"):
                assert sdxl_targets.resolve(written) == ("unet", name), written


def test_eridiffusion_keys_are_the_trainers_own():
    """Pinned from CodeAlexx/EriDiffusion (master 8f1309b: train_sdxl's save_weights and save_full; rust-inference
    e7d8f69: the v1 trainer's LoRACollection::save_weights), for SDXL's block numbering."""
    sdxl = {
        "block_out_channels": [320, 640, 1280],
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    }
    blocks = sgm_unet_paths(sdxl)
    assert sgm_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", blocks) == (
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    )
    assert sgm_name("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", blocks) == (
        "middle_block.1.transformer_blocks.0.attn1.to_q"
    )
    assert sgm_name("up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", blocks) == (
        "output_blocks.0.1.transformer_blocks.0.attn1.to_q"
    )
    assert sgm_name("up_blocks.1.upsamplers.0.conv", blocks) == "output_blocks.5.2.conv"
    assert sgm_name("down_blocks.2.resnets.1.time_emb_proj", blocks) == "input_blocks.8.0.emb_layers.1"


def test_sgm_names_are_the_ones_diffusers_converts_single_files_from(tiny_models):
    """Our mapping inverted: the tiny UNet's whole state dict (norms and biases too, which full differences change)
    under SGM names, converted back by diffusers' own single-file converter, gives the same state dict."""
    unet = tiny_models["unet"]
    blocks = sgm_unet_paths(unet.config)
    ldm = {}
    for key, value in unet.state_dict().items():
        module, _, parameter = key.rpartition(".")
        name = sgm_name(module, blocks)
        assert name is not None, key
        ldm[f"model.diffusion_model.{name}.{parameter}"] = value
    diffusers_words = (
        "down_blocks", "up_blocks", "mid_block.", "resnets", "attentions", "samplers", "conv1", "conv2",
        "time_emb_proj", "conv_shortcut", "embedding.", "conv_in", "conv_out", "conv_norm_out", "norm1", "norm2",
    )  # fmt: skip
    assert not [key for key in ldm if any(word in key for word in diffusers_words if ".transformer_blocks." not in key)]
    converted = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert sorted(converted) == sorted(unet.state_dict())
    assert all(torch.equal(converted[key], value) for key, value in unet.state_dict().items())
