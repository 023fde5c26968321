"""The floor: FLOPs counted on the exact architecture with stock layers, over the matmul rate measured here and now."""

import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(pipeline, width: int, height: int, batch: int) -> dict[str, float]:
    """FLOPs of one UNet call, one VAE encode and one decode at this size, counted on meta-device copies."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_config, vae_config = dict(pipeline.unet.config), dict(pipeline.vae.config)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        scale = pipeline.latent_scale
        latents = torch.empty(batch, 4, height // scale, width // scale)
        text_dim = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
        unet_inputs = {
            "encoder_hidden_states": torch.empty(batch, 77, unet_config["cross_attention_dim"]),
            "added_cond_kwargs": {"text_embeds": torch.empty(batch, text_dim), "time_ids": torch.empty(batch, 6)},
        }
        counts = {}
        for name, call in {
            "unet_step": lambda: unet(latents, torch.empty((), dtype=torch.long), **unet_inputs),
            "vae_encode": lambda: vae.encode(torch.empty(1, 3, height, width)),
            "vae_decode": lambda: vae.decode(latents),
        }.items():
            with FlopCounterMode(display=False) as counter:
                call()
            counts[name] = float(counter.get_total_flops())
    return counts


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul FLOP/s in the model dtype, here and now: the rate the floor assumes.

    The best of several timings rather than their mean: the floor is what this hardware can do, and on a shared
    machine the mean also measures the neighbours.
    """
    side, calls = (8192, 10) if device.type == "cuda" else (2048, 2)
    a, b = torch.randn(side, side, device=device, dtype=dtype), torch.randn(side, side, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(calls):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - started) / calls)
    return 2 * side**3 / best
