"""The trained LoRA's adapters and its kohya file: training starts from the base model exactly, and the file means the
same to the trainer, to this project's reader and to diffusers."""

import copy
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

from models.loras.formats import read_lora
from models.loras.merge import fuse
from models.loras.names import Targets, sgm_unet_paths
from models.tooling.random_weights.configs import component_configs
from models.training.lora import UNET_TARGETS, adapted_layers, add_adapters, kohya_name, lora_tensors
from models.weights.architecture import meta_models

RANK, ALPHA = 4, 8.0


def unet_inputs(unet) -> tuple:
    generator = torch.Generator().manual_seed(5)
    config = unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    extra = {"text_embeds": torch.randn(1, pooled, generator=generator), "time_ids": torch.tensor([[64.0] * 6])}
    return sample, torch.tensor([500]), context, extra


@torch.no_grad()
def unet_output(unet) -> torch.Tensor:
    sample, timestep, context, extra = unet_inputs(unet)
    return unet(sample, timestep, context, added_cond_kwargs=extra).sample


def trained_copy(tiny_models, text_encoders: bool = False) -> tuple[dict, dict]:
    """Copies of the tiny models with adapters whose up matrices are random, as after some training."""
    models = copy.deepcopy(tiny_models)
    generator = torch.Generator().manual_seed(1)
    components = ("unet", "text_encoder", "text_encoder_2") if text_encoders else ("unet",)
    adapters = {name: add_adapters(name, models[name], RANK, ALPHA, generator) for name in components}
    for layers in adapters.values():
        for adapter in layers.values():
            adapter.up.data = torch.randn(adapter.up.shape, generator=generator) * 0.05
    return models, adapters


def test_training_starts_from_the_base_model_exactly(tiny_models):
    base = copy.deepcopy(tiny_models["unet"])  # a copy: its outputs differ from the original's in the last bits
    adapted = copy.deepcopy(tiny_models["unet"])
    adapters = add_adapters("unet", adapted, RANK, ALPHA, torch.Generator().manual_seed(0))
    assert len(adapters) == sum(name.endswith(UNET_TARGETS) for name, _ in base.named_modules())
    assert torch.equal(unet_output(adapted), unet_output(base))


def test_the_same_seed_places_the_same_adapters(tiny_models):
    first, second = (add_adapters("unet", copy.deepcopy(tiny_models["unet"]), RANK, ALPHA,
                                  torch.Generator().manual_seed(3)) for _ in range(2))  # fmt: skip
    assert all(torch.equal(first[name].down, second[name].down) for name in first)


def test_this_projects_reader_merges_the_file_into_what_was_trained(tiny_models, tmp_path: Path):
    trained, adapters = trained_copy(tiny_models, text_encoders=True)
    path = tmp_path / "lora.safetensors"
    save_file(lora_tensors(adapters, dict(tiny_models["unet"].config), torch.float32), path)
    merged = copy.deepcopy(tiny_models)
    targets = Targets.of(merged)
    lora = read_lora(path, targets)
    assert {update.component for update in lora.updates} == {"unet", "text_encoder", "text_encoder_2"}
    fuse(targets, lora.updates, 1.0, torch.float32)
    torch.testing.assert_close(unet_output(merged["unet"]), unet_output(trained["unet"]), rtol=1e-4, atol=1e-5)
    ids = torch.tensor([[1, 5, 9, 2]])
    for name in ("text_encoder", "text_encoder_2"):
        with torch.no_grad():
            expected, got = trained[name](ids).last_hidden_state, merged[name](ids).last_hidden_state
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_diffusers_reads_the_file_as_the_trainer_wrote_it(tiny_models, tmp_path: Path):
    pytest.importorskip("peft")  # diffusers loads LoRAs through peft (a test dependency; serving never imports it)
    trained, adapters = trained_copy(tiny_models)
    unet = tiny_models["unet"]
    path = tmp_path / "lora.safetensors"
    save_file(lora_tensors(adapters, dict(unet.config), torch.float32), path)
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=unet.config)
    loaded = copy.deepcopy(unet)
    StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet=loaded, adapter_name="trained")
    assert not torch.equal(unet_output(trained["unet"]), unet_output(unet))
    torch.testing.assert_close(unet_output(loaded), unet_output(trained["unet"]), rtol=1e-4, atol=1e-5)


def test_every_layer_a_full_size_training_adapts_has_a_name_this_project_resolves_back():
    """On SDXL 1.0's architecture (meta device): every adapted layer's kohya name leads back to the same layer."""
    models = meta_models()
    targets = Targets.of(models)
    blocks = sgm_unet_paths(models["unet"].config)
    counts = {}
    for component, model in models.items():
        layers = adapted_layers(component, model)
        counts[component] = len(layers)
        for name in layers:
            assert targets.resolve(kohya_name(component, name, blocks)) == (component, name)
    assert counts == {"unet": 560, "text_encoder": 44, "text_encoder_2": 128}  # text encoder 1's last layer is unread


def test_text_encoder_ones_last_layer_is_not_adapted_because_sdxl_never_reads_it(tiny_models):
    last = tiny_models["text_encoder"].config.num_hidden_layers - 1
    names = adapted_layers("text_encoder", tiny_models["text_encoder"])
    assert names and not any(name.startswith(f"encoder.layers.{last}.") for name in names)
    assert any(name.startswith(f"encoder.layers.{last - 1}.") for name in names)
    second = tiny_models["text_encoder_2"]
    assert len(adapted_layers("text_encoder_2", second)) == 4 * second.config.num_hidden_layers


def test_names_follow_kohyas_sdxl_scripts():
    blocks = sgm_unet_paths(component_configs("full", 49408).unet)
    assert kohya_name("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", blocks) == (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    )
    assert kohya_name("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0", blocks) == (
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0"
    )
    assert kohya_name("text_encoder_2", "encoder.layers.3.self_attn.q_proj", blocks) == (
        "lora_te2_text_model_encoder_layers_3_self_attn_q_proj"
    )


def test_the_file_is_fp16_with_an_alpha_per_layer(tiny_models):
    _, adapters = trained_copy(tiny_models)
    tensors = lora_tensors(adapters, dict(tiny_models["unet"].config))
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float16}
    alphas = [tensor for key, tensor in tensors.items() if key.endswith(".alpha")]
    assert len(alphas) == len(adapters["unet"]) and all(float(alpha) == ALPHA for alpha in alphas)
