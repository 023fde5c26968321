"""The fast path: fused QKV projections, sub-pixel upsamplers, in-place VAE activations, channels_last convolutions,
and an opt-in torch.compile.

Compile is off by default: it costs minutes at the first boot (cached on disk for later boots, in
$TORCHINDUCTOR_CACHE_DIR, by default next to the weights) and every new working size compiles again.
"""

import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

from .pipeline import DifferentialDiffusionPipeline, EditRequest

log = logging.getLogger(__name__)


def speed_up(pipeline: DifferentialDiffusionPipeline) -> None:
    """Apply the numerically neutral optimisations (compiling is compile_and_warm_up's, when $COMPILE asks for it).

    channels_last: everything on a GPU; on a CPU only the VAE, whose convolutions run faster that way in fp32 while the
    UNet's run slower (docs/BENCHMARKS.md, side measurements).
    """
    on_gpu = pipeline.device.type == "cuda"
    for model in (pipeline.unet, pipeline.vae) if on_gpu else (pipeline.vae,):
        model.to(memory_format=torch.channels_last)
    for model in (pipeline.unet, pipeline.vae):
        fuse_qkv_in_place(model)
        use_subpixel_upsamplers(model)
    use_in_place_activations(pipeline.vae)
    pipeline.loras.on_change = functools.partial(refresh_derived_weights, pipeline.unet)


def fuse_qkv_in_place(model: torch.nn.Module) -> None:
    """Fused QKV projections as diffusers' FusedAttnProcessor2_0 runs them, built without waste.

    diffusers' fuse_qkv_projections() initialises each fused layer at random before copying the weights in (most of
    its seconds for SDXL's UNet on a CPU) and keeps the separate q/k/v weights beside the fused ones (GiBs in fp32).
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


PHASE_TAPS = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=torch.float32)
"""[phase, tap of the 2x2 kernel, tap of the 3x3 kernel] along one axis: which 3x3 taps land on which input pixel."""


def subpixel_kernels(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 convolution after a 2x nearest upsample, as four 2x2 kernels on the input before upsampling.

    Output pixel (2i + a, 2j + b) sees input rows i-1, i (a = 0) or i, i+1 (a = 1), and likewise columns, so each
    output phase (a, b) is one 2x2 convolution whose taps sum the 3x3 taps that land on the same input pixel.
    Returns (4 * out, in, 2, 2), phase-major: kernel (a, b) holds rows (2a + b) * out to (2a + b + 1) * out.
    """
    out_channels, in_channels = weight.shape[:2]
    # One matmul from the 9 taps to (a, b, row tap, column tap), in float32 and then rounded to the weight's dtype:
    # it is part of setup, where slicing and stacking per phase in double cost seconds for SDXL's largest upsampler.
    fold = torch.einsum("ark,bcl->klabrc", PHASE_TAPS, PHASE_TAPS).reshape(9, 16).to(weight.device)
    kernels = (weight.reshape(-1, 9).float() @ fold).to(weight.dtype)
    kernels = kernels.view(out_channels, in_channels, 2, 2, 2, 2).permute(2, 3, 0, 1, 4, 5)
    return kernels.reshape(4 * out_channels, in_channels, 2, 2)


def subpixel_upsample_conv(hidden: torch.Tensor, kernels: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv3x3(nearest_upsample_2x(hidden)) from subpixel_kernels: 16 taps per input pixel instead of 36, and no
    upsampled copy of the input. Keeps the input's memory format (channels_last or contiguous)."""
    batch, _, height, width = hidden.shape
    channels = kernels.shape[0] // 4
    # Padding 1 on every side gives windows starting at rows -1 .. height-1: phase a reads the window at i + a.
    phases = F.conv2d(hidden, kernels, None if bias is None else bias.repeat(4), padding=1).unflatten(1, (2, 2, -1))
    # out is (batch, channels, row, row phase, column, column phase), laid out in memory as the input is.
    if hidden.is_contiguous(memory_format=torch.channels_last):
        out = phases.new_empty(batch, height, 2, width, 2, channels).permute(0, 5, 1, 2, 3, 4)
    else:
        out = phases.new_empty(batch, channels, height, 2, width, 2)
    for a in (0, 1):
        for b in (0, 1):
            out[:, :, :, a, :, b] = phases[:, a, b, :, a : a + height, b : b + width]
    return out.view(batch, channels, 2 * height, 2 * width)


class SubpixelUpsample2D(torch.nn.Module):
    """diffusers' Upsample2D (2x nearest, then a 3x3 convolution) computed by subpixel_upsample_conv.

    Keeps the original convolution, so the state dict is unchanged and an output size other than 2x (which the
    UNet asks for only at sizes off its grid) takes the original path. The folded kernels are a non-persistent
    buffer of 16/9 the convolution's size: ~85 MB for SDXL in bf16.
    """

    def __init__(self, upsampler: Upsample2D):
        super().__init__()
        self.conv = upsampler.conv
        weight = self.conv.weight.detach()
        channels_last = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.register_buffer("kernels", subpixel_kernels(weight).contiguous(memory_format=layout), persistent=False)

    @torch.no_grad()
    def refold(self) -> None:
        """Fold the kernels again after the convolution's weight changed (a LoRA merged or restored), in place."""
        self.kernels.copy_(subpixel_kernels(self.conv.weight.detach()))

    @staticmethod
    def supports(upsampler: Upsample2D) -> bool:
        conv = upsampler.conv
        return (
            upsampler.use_conv
            and upsampler.interpolate
            and not upsampler.use_conv_transpose
            and upsampler.norm is None
            and isinstance(conv, torch.nn.Conv2d)
            and conv.kernel_size == (3, 3)
            and conv.padding == (1, 1)
            and conv.stride == (1, 1)
            and conv.dilation == (1, 1)
            and conv.groups == 1
        )

    def forward(self, hidden: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if output_size is not None and tuple(output_size) != (2 * hidden.shape[-2], 2 * hidden.shape[-1]):
            return self.conv(F.interpolate(hidden, size=output_size, mode="nearest"))
        return subpixel_upsample_conv(hidden, self.kernels, self.conv.bias)


def use_subpixel_upsamplers(model: torch.nn.Module) -> None:
    """Swap each upsample-then-convolve layer for SubpixelUpsample2D: same result, 2.25x fewer FLOPs there."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Upsample2D) and SubpixelUpsample2D.supports(module):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, SubpixelUpsample2D(module))


def use_in_place_activations(vae: torch.nn.Module) -> None:
    """SiLU in place in the VAE wherever it follows a GroupNorm, whose output is always a fresh tensor: the same values,
    and one full-resolution activation fewer per ResNet block, of the largest tensors an edit makes.

    On a CPU each of those is fresh memory for the kernel to fault in and zero, so fewer page faults
    (tests/edit/test_acceleration.py) and less time (docs/BENCHMARKS.md). The UNet keeps its own: there a block's SiLU
    also reads the time embedding that every block shares.
    """
    for module in vae.modules():
        if isinstance(module, ResnetBlock2D) and module.time_emb_proj is None:
            if all(isinstance(norm, torch.nn.GroupNorm) for norm in (module.norm1, module.norm2)):
                module.nonlinearity = in_place_silu(module.nonlinearity)
        elif isinstance(module, Encoder | Decoder) and isinstance(module.conv_norm_out, torch.nn.GroupNorm):
            module.conv_act = in_place_silu(module.conv_act)


def in_place_silu(activation: torch.nn.Module) -> torch.nn.Module:
    """SiLU(inplace=True) in place of a SiLU; any other activation as it is."""
    return torch.nn.SiLU(inplace=True) if type(activation) is torch.nn.SiLU else activation


def refresh_derived_weights(unet: torch.nn.Module, changed: set[tuple[str, str]]) -> None:
    """Recompute what the fast path precomputed from weights that a LoRA changed: the sub-pixel upsamplers' kernels.

    Fused QKV projections need nothing: the separate projections' weights are views of the fused one, so a change
    made in place to either is seen by both.
    """
    for component, name in changed:
        parent = unet.get_submodule(name.rpartition(".")[0]) if component == "unet" else None
        if isinstance(parent, SubpixelUpsample2D):
            parent.refold()


VAE_TILE = 512
"""Side, in pixels, of the tiles a low-memory VAE encodes and decodes: a 1024x1024 picture in 4 overlapping tiles.
diffusers' own default is the VAE's sample size, 1024 for SDXL, which would leave a one-megapixel edit untiled."""


def save_memory(pipeline: DifferentialDiffusionPipeline) -> None:
    """The low-memory mode: the VAE in overlapping tiles (its decode at one megapixel is the largest activation), and
    on a GPU each model moved onto it only while it runs (accelerate's model offload), so that a one-megapixel edit
    fits a card of 8 GB: about the UNet's 5 GB plus one model's activations at a time.

    The models must have been loaded on the CPU; tiles are blended where they overlap, so the picture changes
    slightly (bounded in tests/edit/test_low_vram.py).
    """
    pipeline.vae.enable_tiling()
    pipeline.vae.tile_sample_min_size = VAE_TILE
    pipeline.vae.tile_latent_min_size = VAE_TILE // pipeline.latent_scale
    if pipeline.device.type != "cuda":
        return
    from accelerate import cpu_offload_with_hook

    hook = None
    models = [pipeline.sdxl.text_encoder, pipeline.sdxl.text_encoder_2, pipeline.sdxl.unet, pipeline.sdxl.vae]
    if pipeline.safety is not None:
        models.append(pipeline.safety.model)
    for model in models:  # in the order a request uses them: each one's start offloads the one before
        _, hook = cpu_offload_with_hook(model, pipeline.device, prev_module_hook=hook)
        pipeline.offload_hooks.append(hook)


Compiler = Callable[[torch.nn.Module], torch.nn.Module]


def whole_graph_compile(module: torch.nn.Module) -> torch.nn.Module:
    """torch.compile with the whole forward as one graph: a graph break would fall back to eager in the hot loop."""
    return torch.compile(module, fullgraph=True)


def compile_and_warm_up(
    pipeline: DifferentialDiffusionPipeline,
    compile_cache: Path | None,
    compiler: Compiler = whole_graph_compile,
    side: int = 1024,
) -> None:
    """Compile the UNet and the VAE decoder with `compiler`, then run one edit at side x side (the serving shape).

    Not for the low-memory mode, whose models move between devices. A measurement can pass another compiler (the GPU
    check's dry run passes one that compiles nothing) and time this call.
    """
    if compile_cache is not None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache))
    started = time.perf_counter()
    pipeline.unet = compiler(pipeline.unet)
    pipeline.vae.decoder = compiler(pipeline.vae.decoder)
    warm_up = EditRequest(
        image=np.zeros((side, side, 3), np.uint8), change_map=np.ones((side, side), np.float32), prompt="warm-up"
    )
    pipeline.edit(warm_up)
    log.info("compiled and warmed up at %dx%d in %.1fs", side, side, time.perf_counter() - started)
