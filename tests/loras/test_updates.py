"""models/loras/updates.py: the kinds of update the layout tests in test_formats.py do not reach, each merged as its
writer defines it: LoHa with OneTrainer's 4-D conv factors against peft, DoRA per input channel, a LoKr of full
factors with SimpleTuner's alpha of 10,000, a LoRA on a token embedding, and full differences of norm weights and
biases against their formulas."""

import pytest
import torch

from models.loras.formats import parse_lora
from models.loras.names import Targets
from models.loras.updates import merged_weight
from tests.support.loras import reference

CONV = "mid_block.resnets.1.conv1"
LINEAR = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def targets(tiny_models) -> Targets:
    return Targets.of(tiny_models)


def merged(tensors: dict, targets: Targets, header: dict | None = None) -> dict[tuple[str, str, str], torch.Tensor]:
    """Each (component, module, parameter) the file changes, merged at strength 1."""
    return {
        (update.component, update.module, update.parameter): merged_weight(
            targets.parameter(update.component, update.module, update.parameter), [(update, 1.0)]
        )
        for update in parse_lora(tensors, header or {}, targets)
    }


def test_onetrainer_s_loha_with_4d_conv_factors_merges_to_peft_s_weights(tiny_models, targets):
    """peft (like LyCORIS) flattens a conv's factors to 2-D; OneTrainer's legacy files keep them 4-D."""
    ref = reference(tiny_models, "loha", {"unet": (CONV,)}, seed=4)
    adapter = ref.adapters["unet", CONV]
    out_channels, in_channels, *kernel = tiny_models["unet"].get_submodule(CONV).weight.shape
    key = f"lora_unet_{CONV.replace('.', '_')}"
    tensors = {f"{key}.alpha": adapter["alpha"]}
    for factor in ("w1", "w2"):
        tensors[f"{key}.hada_{factor}_a"] = adapter[f"hada_{factor}_a"].reshape(out_channels, -1, 1, 1).contiguous()
        tensors[f"{key}.hada_{factor}_b"] = adapter[f"hada_{factor}_b"].reshape(-1, in_channels, *kernel).contiguous()
    [(target, weight)] = merged(tensors, targets).items()
    assert target == ("unet", CONV, "weight")
    torch.testing.assert_close(weight, ref.merged["unet", CONV], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("module", [LINEAR, CONV])
def test_dora_per_input_channel_follows_its_formula(tiny_models, targets, module):
    """OneTrainer's and older LyCORIS's DoRA: the norm of each input channel's column is set to the magnitude."""
    weight = tiny_models["unet"].get_submodule(module).weight.detach()
    generator = torch.Generator().manual_seed(2)
    rank, alpha = 2, 3.0
    down = torch.randn(rank, *weight.shape[1:], generator=generator) * 0.1
    up = torch.randn(weight.shape[0], rank, *[1] * (weight.dim() - 2), generator=generator) * 0.1
    magnitude = torch.rand(1, weight.shape[1], generator=generator) + 0.5
    key = f"lora_unet_{module.replace('.', '_')}"
    tensors = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha),
               f"{key}.dora_scale": magnitude}  # fmt: skip
    combined = weight + (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    columns = combined.transpose(0, 1).flatten(1).norm(dim=1)  # one norm per input channel
    expected = combined * (magnitude.flatten() / columns).reshape(1, -1, *[1] * (weight.dim() - 2))
    torch.testing.assert_close(merged(tensors, targets)["unet", module, "weight"], expected, rtol=1e-5, atol=1e-6)


def test_simpletuner_s_full_factor_lokr_ignores_its_alpha_of_10000(tiny_models, targets):
    weight = tiny_models["unet"].get_submodule(LINEAR).weight.detach()
    generator = torch.Generator().manual_seed(3)
    first = torch.randn(2, 4, generator=generator) * 0.1
    second = torch.randn(weight.shape[0] // 2, weight.shape[1] // 4, generator=generator) * 0.1
    key = f"lycoris_{LINEAR.replace('.', '_')}"
    tensors = {f"{key}.lokr_w1": first, f"{key}.lokr_w2": second, f"{key}.alpha": torch.tensor(10000.0)}
    expected = weight + torch.kron(first, second)
    torch.testing.assert_close(merged(tensors, targets)["unet", LINEAR, "weight"], expected, rtol=1e-6, atol=1e-7)


def test_a_lora_on_the_token_embedding_follows_its_formula(tiny_models, targets):
    """ComfyUI's LoraSave on a text encoder extracts its token embedding too: rows = tokens, columns = width."""
    table = tiny_models["text_encoder"].get_input_embeddings().weight.detach()
    generator = torch.Generator().manual_seed(5)
    down = torch.randn(2, table.shape[1], generator=generator)
    up = torch.randn(table.shape[0], 2, generator=generator)
    key = "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding"
    tensors = {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down}
    expected = table + up @ down
    changed = merged(tensors, targets)
    torch.testing.assert_close(changed["text_encoder", "embeddings.token_embedding", "weight"], expected)


def test_full_differences_of_norm_weights_and_biases_are_added_as_they_are(tiny_models, targets):
    """ComfyUI's LoraSave default: .diff for a 1-D norm weight, .diff_b for a bias; no alpha, no scale."""
    unet = tiny_models["unet"]
    generator = torch.Generator().manual_seed(6)
    norm, out = unet.get_submodule("mid_block.resnets.1.norm1"), unet.get_submodule(CONV)
    tensors = {
        "diffusion_model.middle_block.2.in_layers.0.diff": torch.randn(norm.weight.shape, generator=generator),
        "diffusion_model.middle_block.2.in_layers.0.diff_b": torch.randn(norm.bias.shape, generator=generator),
        "diffusion_model.middle_block.2.in_layers.2.diff_b": torch.randn(out.bias.shape, generator=generator),
    }
    changed = merged(tensors, targets)
    assert sorted(changed) == [("unet", "mid_block.resnets.1.conv1", "bias"), ("unet", "mid_block.resnets.1.norm1",
                               "bias"), ("unet", "mid_block.resnets.1.norm1", "weight")]  # fmt: skip
    for (_, module, parameter), value in changed.items():
        sgm = "in_layers.0" if module.endswith("norm1") else "in_layers.2"
        ending = ".diff" if parameter == "weight" else ".diff_b"
        difference = tensors[f"diffusion_model.middle_block.2.{sgm}{ending}"]
        assert torch.equal(value, getattr(unet.get_submodule(module), parameter).detach() + difference)
