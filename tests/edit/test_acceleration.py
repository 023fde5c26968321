"""The fast path changes speed, not results."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

from models import acceleration, settings
from models.tooling.measuring import weight_bytes
from models.weights.load import load_pipeline
from tests.support.unet import unet_inputs

ROOT = Path(__file__).resolve().parents[2]


def test_fused_qkv_projections_give_the_same_unet_output(tiny_weights):
    unet = UNet2DConditionModel.from_pretrained(tiny_weights, subfolder="unet").eval()
    inputs = unet_inputs(unet, side=8, timestep=499, seed=0)
    with torch.inference_mode():
        plain = unet(**inputs).sample
        acceleration.fuse_qkv_in_place(unet)
        fused = unet(**inputs).sample
        unet.unfuse_qkv_projections()
        unfused_again = unet(**inputs).sample
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unfused_again, plain, rtol=0, atol=0)


def test_fusing_initialises_nothing_it_then_overwrites(tiny_weights):
    """diffusers' own fusion draws random weights for every fused layer first: 8.4 s of SDXL's CPU setup."""
    unet = UNet2DConditionModel.from_pretrained(tiny_weights, subfolder="unet")
    random_state = torch.get_rng_state()
    acceleration.fuse_qkv_in_place(unet)
    assert torch.equal(torch.get_rng_state(), random_state)


def test_fused_qkv_projections_cost_no_weight_memory(tiny_weights):
    for model in (
        UNet2DConditionModel.from_pretrained(tiny_weights, subfolder="unet").requires_grad_(False),
        AutoencoderKL.from_pretrained(tiny_weights, subfolder="vae").requires_grad_(False),
    ):
        unfused = weight_bytes(model)
        acceleration.fuse_qkv_in_place(model)
        assert weight_bytes(model) == unfused
        assert not any(param.requires_grad for param in model.parameters())  # as loading left them


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_subpixel_upsampler_equals_nearest_upsample_then_convolution(layout):
    torch.manual_seed(0)
    stock = Upsample2D(6, use_conv=True, out_channels=5).to(memory_format=layout)
    hidden = torch.randn(2, 6, 7, 4).contiguous(memory_format=layout)  # odd and non-square: every border counts
    subpixel = acceleration.SubpixelUpsample2D(stock)
    with torch.inference_mode():
        expected, upsampled = stock(hidden), subpixel(hidden)
    torch.testing.assert_close(upsampled, expected, rtol=1e-5, atol=1e-5)
    assert upsampled.is_contiguous(memory_format=layout)


def test_subpixel_upsampler_takes_the_original_path_for_other_output_sizes():
    torch.manual_seed(0)
    stock = Upsample2D(3, use_conv=True)
    hidden = torch.randn(1, 3, 4, 5)
    with torch.inference_mode():
        for size in [(8, 10), (9, 10)]:
            torch.testing.assert_close(acceleration.SubpixelUpsample2D(stock)(hidden, size), stock(hidden, size))


def test_subpixel_upsamplers_keep_the_unet_and_vae_outputs_and_state_dicts(tiny_weights):
    unet = UNet2DConditionModel.from_pretrained(tiny_weights, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(tiny_weights, subfolder="vae").eval()
    inputs = unet_inputs(unet, side=8, timestep=499, seed=0)
    latents = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(1))
    state_dicts = {model: dict(model.state_dict()) for model in (unet, vae)}
    with torch.inference_mode():
        plain = unet(**inputs).sample, vae.decode(latents).sample
        for model in (unet, vae):
            acceleration.use_subpixel_upsamplers(model)
        subpixel = unet(**inputs).sample, vae.decode(latents).sample
    swapped = [module for model in (unet, vae) for module in model.modules()]
    assert not any(isinstance(module, Upsample2D) for module in swapped)
    assert sum(isinstance(module, acceleration.SubpixelUpsample2D) for module in swapped) == 2 + 3
    for model, before in state_dicts.items():
        assert model.state_dict().keys() == before.keys()
    for got, expected in zip(subpixel, plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_in_place_activations_keep_the_vae_outputs_bit_for_bit(tiny_weights):
    vae = AutoencoderKL.from_pretrained(tiny_weights, subfolder="vae").eval()
    generator = torch.Generator().manual_seed(2)
    pixels = torch.rand(1, 3, 48, 64, generator=generator) * 2 - 1
    latents = torch.randn(1, 4, 6, 8, generator=generator)
    with torch.inference_mode():
        plain = vae.encode(pixels).latent_dist.mean, vae.decode(latents).sample
        acceleration.use_in_place_activations(vae)
        in_place = vae.encode(pixels).latent_dist.mean, vae.decode(latents).sample
    resnets = [module for module in vae.modules() if isinstance(module, ResnetBlock2D)]
    assert resnets and all(in_place_silu(resnet.nonlinearity) for resnet in resnets)
    assert in_place_silu(vae.encoder.conv_act) and in_place_silu(vae.decoder.conv_act)
    for got, expected in zip(in_place, plain, strict=True):
        assert torch.equal(got, expected)


def in_place_silu(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.SiLU) and module.inplace


def test_loaded_pipeline_has_in_place_vae_activations_and_leaves_the_unet_its_own(pipeline):
    """A UNet block's SiLU also reads the time embedding all blocks share: in place, it would change it."""
    assert in_place_silu(pipeline.vae.decoder.conv_act)
    assert not any(in_place_silu(module) for module in pipeline.unet.modules())


IN_PLACE_FAULTS = """
import resource, sys, torch
from diffusers import AutoencoderKL
from models import acceleration, heap
heap.configure()
vae = AutoencoderKL.from_pretrained(sys.argv[1], subfolder="vae").eval().to(memory_format=torch.channels_last)
acceleration.use_subpixel_upsamplers(vae)
latents = torch.randn(1, 4, 128, 128)

def faults() -> int:
    counts = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        vae.decode(latents)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(counts[1:])

with torch.inference_mode():
    plain = faults()
    acceleration.use_in_place_activations(vae)
    print(plain, faults())
"""


@pytest.mark.slow
def test_in_place_activations_fault_in_fewer_pages_on_a_cpu(tiny_weights):
    """A 1024x1024 decode on tiny weights, the VAE and heap policy as served on a CPU: each activation not made is
    fresh memory the kernel does not fault in and zero (16-39% of the decode's faults in five runs)."""
    child = subprocess.run(
        [sys.executable, "-c", IN_PLACE_FAULTS, str(tiny_weights)], cwd=ROOT, capture_output=True, text=True
    )
    assert child.returncode == 0, child.stderr
    plain, in_place = map(int, child.stdout.split())
    assert in_place < 0.9 * plain, (plain, in_place)


def test_loaded_pipeline_runs_fused_attention(pipeline):
    attentions = [module for module in pipeline.unet.modules() if hasattr(module, "fused_projections")]
    assert attentions and all(module.fused_projections for module in attentions)


def test_loaded_pipeline_upsamples_sub_pixel(pipeline):
    modules = [*pipeline.unet.modules(), *pipeline.vae.modules()]
    assert any(isinstance(module, acceleration.SubpixelUpsample2D) for module in modules)
    assert not any(isinstance(module, Upsample2D) for module in modules)


def test_cpu_pipeline_keeps_vae_convolutions_channels_last_and_the_unet_contiguous(pipeline):
    assert pipeline.device.type == "cpu"
    vae_conv, unet_conv = pipeline.vae.decoder.conv_in.weight, pipeline.unet.conv_in.weight
    vae_upsampler, unet_upsampler = (
        pipeline.vae.decoder.up_blocks[0].upsamplers[0],
        pipeline.unet.up_blocks[0].upsamplers[0],
    )
    for vae_weight in (vae_conv, vae_upsampler.kernels):
        assert vae_weight.is_contiguous(memory_format=torch.channels_last) and not vae_weight.is_contiguous()
    for unet_weight in (unet_conv, unet_upsampler.kernels):
        assert unet_weight.is_contiguous()


def test_compile_switch_compiles_and_warms_up_at_the_serving_shape(tiny_weights, monkeypatch):
    compiled, edits = [], []
    monkeypatch.setenv(settings.COMPILE.name, "1")
    monkeypatch.setattr(torch, "compile", lambda module, **options: compiled.append(module) or module)
    real_edit = acceleration.DifferentialDiffusionPipeline.edit
    monkeypatch.setattr(
        acceleration.DifferentialDiffusionPipeline,
        "edit",
        lambda self, request: edits.append(request.image.shape) or real_edit(self, request),
    )
    pipeline = load_pipeline(tiny_weights)
    assert compiled == [pipeline.unet, pipeline.vae.decoder]
    assert edits == [(1024, 1024, 3)]


def test_compile_is_off_by_default(monkeypatch):
    monkeypatch.delenv(settings.COMPILE.name, raising=False)
    assert not settings.enabled(settings.COMPILE)
