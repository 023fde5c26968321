"""One UNet call on fixed random inputs, to compare a UNet's output before and after a change."""

import torch
from diffusers import UNet2DConditionModel


def unet_inputs(unet: UNet2DConditionModel, side: int = 16, timestep: int = 759, seed: int = 1) -> dict:
    """Inputs for one call on side x side latents, batch 1, drawn from the seed."""
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    text_embeds_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    pixels = float(side * 8)
    return {
        "sample": torch.randn(1, 4, side, side, generator=generator),
        "timestep": torch.tensor(timestep),
        "encoder_hidden_states": torch.randn(1, 77, config.cross_attention_dim, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(1, text_embeds_dim, generator=generator),
            "time_ids": torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]]),
        },
    }


def run_unet(unet: UNet2DConditionModel) -> torch.Tensor:
    with torch.inference_mode():
        return unet(**unet_inputs(unet)).sample
