"""models/loras/summary.py: each writer's naming recognised from its keys, and the parts of SDXL a file changes."""

import pytest

from models.loras.summary import naming, part
from models.weights.architecture import meta_models
from tests.support.writers import writers

KOHYA = "kohya's names (lora_unet_, lora_te1_, lora_te2_): kohya, LyCORIS, OneTrainer, ai-toolkit"
NAMINGS = {
    "kohya": f"{KOHYA}; SGM block names",
    "onetrainer-legacy": f"{KOHYA}; diffusers block names",
    "simpletuner-lokr": "SimpleTuner's LyCORIS names (lycoris_); diffusers block names",
    "comfyui-lorasave": "ComfyUI's names (diffusion_model., text_encoders.): ComfyUI, OneTrainer's ComfyUI output; SGM"
    " block names",
    "onetrainer-omi": "diffusers' names (unet., text_encoder., text_encoder_2.); SGM block names",
    "peft-save_pretrained": "peft's save_pretrained names (base_model.model.); diffusers block names",
    "cog-sdxl": "attention processors, no prefix (Replicate's SDXL trainings); diffusers block names",
    "diffusers-0.19-processors": "attention processors under unet. (diffusers 0.19); diffusers block names",
}


@pytest.fixture(scope="module")
def made() -> dict:
    return writers(meta_models())


@pytest.mark.parametrize("writer", list(NAMINGS))
def test_each_writer_s_naming_is_recognised(made, writer):
    assert naming(made[writer]().tensors) == NAMINGS[writer]


@pytest.mark.parametrize(
    ("component", "module", "expected"),
    [
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "UNet attention"),
        ("unet", "mid_block.attentions.0.transformer_blocks.3.ff.net.2", "UNet feed-forward"),
        ("unet", "up_blocks.0.attentions.2.proj_out", "UNet attention in/out projections"),
        ("unet", "down_blocks.0.resnets.1.time_emb_proj", "UNet resnets"),
        ("unet", "up_blocks.1.upsamplers.0.conv", "UNet other convolutions"),
        ("unet", "add_embedding.linear_2", "UNet time and size embeddings"),
        ("unet", "conv_norm_out", "UNet norms"),
        ("text_encoder_2", "text_projection", "text encoder 2"),
    ],
)
def test_parts_of_sdxl(component, module, expected):
    assert part(component, module) == expected
