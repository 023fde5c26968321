"""The fast path changes speed, not results."""

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from models import acceleration
from models.loading import load_pipeline
from tests.scripts import load_script

weight_bytes = load_script("benchmark").weight_bytes  # views of one tensor count once


def unet_inputs(unet: UNet2DConditionModel) -> dict:
    generator = torch.Generator().manual_seed(0)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    text_embeds_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return {
        "sample": torch.randn(1, 4, 8, 8, generator=generator),
        "timestep": torch.tensor(499),
        "encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(1, text_embeds_dim, generator=generator),
            "time_ids": time_ids,
        },
    }


def test_fused_qkv_projections_give_the_same_unet_output(tiny_weights):
    unet = UNet2DConditionModel.from_pretrained(tiny_weights, subfolder="unet").eval()
    inputs = unet_inputs(unet)
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


def test_loaded_pipeline_runs_fused_attention(pipeline):
    attentions = [module for module in pipeline.unet.modules() if hasattr(module, "fused_projections")]
    assert attentions and all(module.fused_projections for module in attentions)


def test_cpu_pipeline_keeps_vae_convolutions_channels_last_and_the_unet_contiguous(pipeline):
    assert pipeline.device.type == "cpu"
    vae_conv, unet_conv = pipeline.vae.decoder.conv_in.weight, pipeline.unet.conv_in.weight
    assert vae_conv.is_contiguous(memory_format=torch.channels_last) and not vae_conv.is_contiguous()
    assert unet_conv.is_contiguous()


def test_compile_switch_compiles_and_warms_up_at_the_serving_shape(tiny_weights, monkeypatch):
    compiled, edits = [], []
    monkeypatch.setenv(acceleration.COMPILE_SWITCH, "1")
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
    monkeypatch.delenv(acceleration.COMPILE_SWITCH, raising=False)
    assert not acceleration.compile_requested()
