"""SDXL 1.0 base's architecture as its published configs give it, and the models built from them on the meta device:
for reading a LoRA's names against every SDXL layer without loading a byte of weights (scripts/lora-info, and the
tests' full-size key lists), and for the full-size random test weights."""

from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

CLIP_VOCAB_SIZE = 49408
MAX_TOKENS = 77

CLIP_L: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
"""The first text encoder, OpenAI's CLIP ViT-L/14."""

CLIP_G: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
"""The second, OpenCLIP's ViT-bigG/14, with its projection."""

UNET_TIME_EMBED_DIM = 256

UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "norm_eps": 1e-5,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "use_linear_projection": True,
    "upcast_attention": False,
    "addition_embed_type": "text_time",
    "cross_attention_dim": CLIP_L["hidden_size"] + CLIP_G["hidden_size"],
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "norm_num_groups": 32,
    "addition_time_embed_dim": UNET_TIME_EMBED_DIM,
    "addition_embed_type_num_heads": 64,
    "projection_class_embeddings_input_dim": 6 * UNET_TIME_EMBED_DIM + CLIP_G["projection_dim"],
}
"""The UNet: three levels, attention at the two coarser ones, 10 transformer layers per block at the coarsest."""

VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": False,
}
"""The VAE, with the fp16-fix's settings (no float32 upcast)."""


def meta_models(folder: Path | None = None) -> dict[str, nn.Module]:
    """SDXL's UNet and text encoders on the meta device (no memory, no weights): from a weights folder's configs, or
    SDXL 1.0 base's."""
    text = {"vocab_size": CLIP_VOCAB_SIZE, "max_position_embeddings": MAX_TOKENS}
    with torch.device("meta"):
        if folder is not None:
            return {
                "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
                "text_encoder_2": CLIPTextModelWithProjection(
                    CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
                ),
            }
        return {
            "unet": UNet2DConditionModel(**UNET),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L, **text)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G, **text)),
        }
