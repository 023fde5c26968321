"""The fast path: fused QKV projections, channels_last on CUDA, and an opt-in torch.compile.

Compile is off by default: it costs minutes at the first boot (cached on disk for later boots, in
$TORCHINDUCTOR_CACHE_DIR, by default next to the weights) and every new working size compiles again.
"""

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from .pipeline import DifferentialDiffusionPipeline, EditRequest

log = logging.getLogger(__name__)

COMPILE_SWITCH = "COMPILE"
"""Environment variable: 1 compiles the UNet and VAE decoder in setup(), warmed up at 1024x1024."""


def compile_requested() -> bool:
    return os.environ.get(COMPILE_SWITCH, "0").strip().lower() in ("1", "true", "yes", "on")


def speed_up(pipeline: DifferentialDiffusionPipeline, compile_cache: Path | None = None) -> None:
    """Apply the numerically neutral optimisations, and compile when $COMPILE asks for it."""
    pipeline.unet.fuse_qkv_projections()
    pipeline.vae.fuse_qkv_projections()
    if pipeline.device.type == "cuda":
        pipeline.unet.to(memory_format=torch.channels_last)
        pipeline.vae.to(memory_format=torch.channels_last)
    if compile_requested():
        compile_and_warm_up(pipeline, compile_cache)


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
