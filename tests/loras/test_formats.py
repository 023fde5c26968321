"""models/loras (formats, updates, merge): every SDXL LoRA layout read to the weights peft merges it into, refusals
in one line, the SGM mapping against diffusers' own converter, and exact merging and restoring in the
loaded pipeline."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from models.loras import formats
from models.loras import updates as layer_updates
from models.loras.formats import LoraError, parse_lora
from models.loras.names import Targets
from tests.support.loras import LAYOUTS, TARGETS, lora_file
from tests.support.unet import run_unet

ATOL = 2e-6


@pytest.fixture(scope="module")
def models(tiny_models) -> dict:
    return tiny_models


@pytest.fixture(scope="module")
def targets(models) -> Targets:
    return Targets.of(models)


def merged_by_us(tensors, header, targets: Targets) -> dict:
    updates = parse_lora(tensors, header, targets)
    return {
        (update.component, update.module): layer_updates.merged_weight(
            targets.modules[update.component, update.module].weight, [(update, 1.0)]
        )
        for update in updates
    }


def assert_merges_like_peft(ours: dict, reference) -> None:
    assert sorted(ours) == sorted(reference.merged)
    for target, expected in reference.merged.items():
        torch.testing.assert_close(ours[target], expected, rtol=1e-5, atol=ATOL, msg=f"{target}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_lora_layout_merges_to_peft_s_weights(models, targets, layout):
    tensors, header, reference = lora_file(models, layout)
    assert_merges_like_peft(merged_by_us(tensors, header, targets), reference)


@pytest.mark.parametrize(
    ("kind", "layout"), [("loha", "kohya"), ("lokr", "kohya"), ("loha", "eridiffusion-v2-lycoris")]
)
def test_loha_and_lokr_merge_to_peft_s_weights(models, targets, kind, layout):
    chosen = TARGETS if layout == "kohya" else {"unet": TARGETS["unet"][:5]}
    tensors, header, reference = lora_file(models, layout, kind=kind, targets=chosen)
    assert_merges_like_peft(merged_by_us(tensors, header, targets), reference)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_dora_merges_to_peft_s_weights(models, targets, layout):
    tensors, header, reference = lora_file(models, layout, dora=True)
    assert any(key.endswith(("dora_scale", "lora_magnitude_vector")) for key in tensors)
    assert_merges_like_peft(merged_by_us(tensors, header, targets), reference)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4)},
         "an SD 1.x/2.x LoRA: none of its tensors fit"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}, "an SD 1.x/2.x LoRA"),
        ({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
          "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)}, "a Flux LoRA"),
        ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072)}, "a Flux LoRA"),
        ({"transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight": torch.zeros(4, 1536)}, "an SD 3 or Flux"),
        ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_down.weight": torch.zeros(4, 1536)}, "SD 3"),
        ({"some.other.model.lora_A.weight": torch.zeros(4, 8)}, "not an SDXL LoRA"),
        ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(4, 768),
          "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.zeros(32, 4)},
         "made for another base model: its unet layer .*attn2.to_k maps 768 to 32 features, SDXL's maps 64 to 32"),
        ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32)},
         "lacks up: the file is incomplete"),
        ({"lora_unet_mid_block_resnets_1_conv1.lora_down.weight": torch.zeros(4, 64, 3, 3),
          "lora_unet_mid_block_resnets_1_conv1.lora_mid.weight": torch.zeros(4, 4, 3, 3),
          "lora_unet_mid_block_resnets_1_conv1.lora_up.weight": torch.zeros(64, 4, 1, 1)}, "Tucker"),
        ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.bias": torch.zeros(32)}, "biases"),
        ({"lora_unet_mid_block_resnets_1_conv1.diff": torch.zeros(64, 32, 3, 3)},
         r"conv1 changes a weight of shape \(64, 32, 3, 3\), SDXL's is \(64, 64, 3, 3\)"),
        ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.diff_b": torch.zeros(32)},
         "attn1.to_q has no bias to change"),
        ({}, "holds no LoRA tensors"),
    ],
    ids=["sd15-te", "sd15-unet", "flux", "flux-kohya", "sd3-diffusers", "sd3-sgm", "unknown", "sd15-shapes",
         "half-pair", "tucker", "bias", "diff-shape", "diff-no-bias", "empty"],
)  # fmt: skip
def test_a_lora_that_does_not_fit_sdxl_is_refused_in_one_line(targets, tensors, message):
    with pytest.raises(LoraError, match=message) as refused:
        parse_lora(tensors, {}, targets)
    assert "\n" not in str(refused.value)


def test_one_foreign_key_among_good_ones_refuses_the_whole_file(models, targets):
    tensors, header, _ = lora_file(models, "kohya")
    tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    with pytest.raises(LoraError, match=r"an SD 1.x/2.x LoRA: 1 of its \d+ tensors fit no SDXL layer"):
        parse_lora(tensors, header, targets)


def test_a_pickle_is_not_read(tmp_path, targets):
    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(LoraError, match="not a readable safetensors file"):
        formats.read_lora(path, targets)


# The merger on the loaded pipeline: fused QKV projections and sub-pixel upsamplers must see every change.


def unet_output(pipeline) -> torch.Tensor:
    return run_unet(pipeline.unet)


@pytest.fixture
def fresh_pipeline(tiny_weights):
    from models.weights.load import load_pipeline

    return load_pipeline(tiny_weights, torch.device("cpu"), torch.float32)


def test_a_merged_lora_reaches_the_fast_path_and_restores_bit_for_bit(fresh_pipeline, tmp_path):
    pipeline = fresh_pipeline
    unet = pipeline.unet
    before = unet_output(pipeline)
    models = {"unet": unet, "text_encoder": pipeline.sdxl.text_encoder, "text_encoder_2": pipeline.sdxl.text_encoder_2}
    tensors, header, reference = lora_file(models, "kohya", seed=5)
    path = tmp_path / "lora.safetensors"
    save_file(tensors, path, header)
    snapshot = {name: {k: v.clone() for k, v in model.state_dict().items()} for name, model in models.items()}
    upsampler = unet.get_submodule("up_blocks.0.upsamplers.0")
    kernels_before = upsampler.kernels.clone()

    pipeline.loras.apply(("lora", 1.0), [(pipeline.loras.read(path).updates, 1.0)])
    after = unet_output(pipeline)
    assert not torch.equal(upsampler.kernels, kernels_before)  # refolded from the merged convolution
    # The weights peft merges, in a stock UNet (unfused attention, stock upsamplers).
    stock = UNet2DConditionModel.from_config(unet.config).eval()
    stock.load_state_dict(
        {key: value for key, value in snapshot["unet"].items() if ".to_qkv." not in key and ".to_kv." not in key}
    )
    for (component, module), weight in reference.merged.items():
        if component == "unet":
            stock.get_submodule(module).weight.data.copy_(weight)
    torch.testing.assert_close(after, run_unet(stock), rtol=1e-4, atol=1e-5)
    assert (after - before).abs().max() > 1e-3
    assert pipeline.loras.copied_bytes() == sum(
        models[c].get_submodule(m).weight.numel() * 4 for c, m in reference.merged
    )

    pipeline.loras.apply((), [])
    assert torch.equal(unet_output(pipeline), before)
    for name, model in models.items():
        assert all(torch.equal(value, snapshot[name][key]) for key, value in model.state_dict().items()), name
    assert torch.equal(upsampler.kernels, kernels_before)


def test_strength_zero_and_two_loras(fresh_pipeline, tmp_path):
    pipeline = fresh_pipeline
    models = {
        "unet": pipeline.unet,
        "text_encoder": pipeline.sdxl.text_encoder,
        "text_encoder_2": pipeline.sdxl.text_encoder_2,
    }
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tensors, header, ref_a = lora_file(models, "peft", seed=1)
    save_file(tensors, first, header)
    tensors, header, ref_b = lora_file(models, "kohya", seed=2)
    save_file(tensors, second, header)
    before = unet_output(pipeline)
    pipeline.loras.apply(("a", 0.0), [(pipeline.loras.read(first).updates, 0.0)])
    assert torch.equal(unet_output(pipeline), before)
    updates_a, updates_b = pipeline.loras.read(first).updates, pipeline.loras.read(second).updates
    pipeline.loras.apply(("ab",), [(updates_a, 0.5), (updates_b, -1.0)])
    for target in ref_a.merged:
        original = pipeline.loras.originals[(*target, "weight")].float()
        expected = original + 0.5 * (ref_a.merged[target] - original) - (ref_b.merged[target] - original)
        torch.testing.assert_close(models[target[0]].get_submodule(target[1]).weight, expected, rtol=1e-5, atol=1e-5)
    pipeline.loras.apply((), [])
    assert torch.equal(unet_output(pipeline), before)


def test_a_failure_part_way_leaves_the_reference_weights(fresh_pipeline, tmp_path, monkeypatch):
    pipeline = fresh_pipeline
    models = {
        "unet": pipeline.unet,
        "text_encoder": pipeline.sdxl.text_encoder,
        "text_encoder_2": pipeline.sdxl.text_encoder_2,
    }
    tensors, header, _ = lora_file(models, "kohya", seed=3)
    path = tmp_path / "lora.safetensors"
    save_file(tensors, path, header)
    updates = pipeline.loras.read(path).updates
    before = unet_output(pipeline)
    calls = []

    def failing(merged, update, strength):
        calls.append(update)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return original_add(merged, update, strength)

    original_add = layer_updates.add_update
    monkeypatch.setattr(layer_updates, "add_update", failing)
    with pytest.raises(RuntimeError):
        pipeline.loras.apply(("x",), [(updates, 1.0)])
    assert pipeline.loras.applied == () and not pipeline.loras.originals
    assert torch.equal(unet_output(pipeline), before)


def test_a_merge_that_leaves_the_dtype_range_is_refused_and_leaves_the_reference():
    """fp16 stops at 65504: a finite LoRA at a high scale can overflow it; the weights stay as they were."""
    from models.loras.merge import LoraMerger
    from models.loras.updates import LayerUpdate

    layer = torch.nn.Linear(4, 4).half()
    before = layer.weight.detach().clone()
    merger = LoraMerger({"text_encoder": torch.nn.Sequential(layer)})
    tensors = {"down": torch.full((1, 4), 1000.0), "up": torch.full((4, 1), 1000.0)}
    update = LayerUpdate("text_encoder", "0", "lora", tensors)
    message = r"^merged at these scales, text_encoder layer 0's weight leaves the torch.float16"
    with pytest.raises(LoraError, match=message):
        merger.apply(("x",), [([update], 3.0)])
    assert torch.equal(layer.weight, before) and merger.applied == () and not merger.originals
