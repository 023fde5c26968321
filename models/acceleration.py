"""The fast path: fused QKV projections, channels_last convolutions, and an opt-in torch.compile.

Compile is off by default: it costs minutes at the first boot (cached on disk for later boots, in
$TORCHINDUCTOR_CACHE_DIR, by default next to the weights) and every new working size compiles again.
"""

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

from .pipeline import DifferentialDiffusionPipeline, EditRequest

log = logging.getLogger(__name__)

COMPILE_SWITCH = "COMPILE"
"""Environment variable: 1 compiles the UNet and VAE decoder in setup(), warmed up at 1024x1024."""


def compile_requested() -> bool:
    return os.environ.get(COMPILE_SWITCH, "0").strip().lower() in ("1", "true", "yes", "on")


def speed_up(pipeline: DifferentialDiffusionPipeline, compile_cache: Path | None = None) -> None:
    """Apply the numerically neutral optimisations, and compile when $COMPILE asks for it.

    channels_last: everything on a GPU; on a CPU only the VAE, whose convolutions run 6-12% faster that way in fp32
    while the UNet runs 0-5% slower (measured at 256 and 512 px, docs/BENCHMARKS.md).
    """
    on_gpu = pipeline.device.type == "cuda"
    for model in (pipeline.unet, pipeline.vae) if on_gpu else (pipeline.vae,):
        model.to(memory_format=torch.channels_last)
    for model in (pipeline.unet, pipeline.vae):
        fuse_qkv_in_place(model)
    if compile_requested():
        compile_and_warm_up(pipeline, compile_cache)


def fuse_qkv_in_place(model: torch.nn.Module) -> None:
    """Fused QKV projections as diffusers' FusedAttnProcessor2_0 runs them, built without waste.

    diffusers' fuse_qkv_projections() initialises each fused layer at random before copying the weights in (8.4 of
    9.7 s for SDXL's UNet on a CPU) and keeps the separate q/k/v weights beside the fused ones (+2.4 GiB in fp32).
    Here each fused weight is the concatenation itself and the separate weights become views of it, so the model
    keeps its state dict and unfuse_qkv_projections() still works.
    """
    model.original_attn_processors = model.attn_processors
    for attention in model.modules():
        if isinstance(attention, Attention):
            names = ("to_k", "to_v") if attention.is_cross_attention else ("to_q", "to_k", "to_v")
            fused = concatenated_linear([getattr(attention, name) for name in names])
            setattr(attention, "to_kv" if attention.is_cross_attention else "to_qkv", fused)
            attention.fused_projections = True
    model.set_attn_processor(FusedAttnProcessor2_0())


def concatenated_linear(parts: list[torch.nn.Linear]) -> torch.nn.Linear:
    """One linear layer computing the parts' outputs side by side; the parts' weights become views of its own."""
    with torch.device("meta"):
        fused = torch.nn.Linear(
            parts[0].in_features, sum(part.out_features for part in parts), bias=parts[0].bias is not None
        )
    for name in ("weight", "bias"):
        if getattr(fused, name) is None:
            continue
        whole = torch.cat([getattr(part, name).detach() for part in parts])
        setattr(fused, name, torch.nn.Parameter(whole, requires_grad=False))
        pieces = whole.split([part.out_features for part in parts])
        for part, piece in zip(parts, pieces, strict=True):
            setattr(part, name, torch.nn.Parameter(piece, requires_grad=False))
    return fused


def compile_and_warm_up(pipeline: DifferentialDiffusionPipeline, compile_cache: Path | None) -> None:
    """Compile the UNet and the VAE decoder, then run one edit at the default serving shape."""
    if compile_cache is not None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache))
    started = time.perf_counter()
    pipeline.unet = torch.compile(pipeline.unet, fullgraph=True)
    pipeline.vae.decoder = torch.compile(pipeline.vae.decoder, fullgraph=True)
    side = 1024
    warm_up = EditRequest(
        image=np.zeros((side, side, 3), np.uint8), change_map=np.ones((side, side), np.float32), prompt="warm-up"
    )
    pipeline.edit(warm_up)
    log.info("compiled and warmed up at %dx%d in %.1fs", side, side, time.perf_counter() - started)
