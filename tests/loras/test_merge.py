"""models/loras/merge.py: full differences of biases and norm weights merged into the loaded pipeline and restored
bit for bit, and the copies kept no larger than exactness needs."""

import pytest
import torch
from safetensors.torch import save_file

from models.loras.merge import LoraMerger
from models.loras.updates import LayerUpdate
from tests.support.loras import lora_file
from tests.support.unet import run_unet


@pytest.fixture
def fresh_pipeline(tiny_weights):
    from models.weights.load import load_pipeline

    return load_pipeline(tiny_weights, torch.device("cpu"), torch.float32)


def test_full_differences_and_a_lora_merge_into_the_fast_path_and_restore_bit_for_bit(fresh_pipeline, tmp_path):
    pipeline = fresh_pipeline
    models = {"unet": pipeline.unet, "text_encoder": pipeline.sdxl.text_encoder,
              "text_encoder_2": pipeline.sdxl.text_encoder_2}  # fmt: skip
    tensors, header, _ = lora_file(models, "kohya", seed=7)
    generator = torch.Generator().manual_seed(7)
    for name, module in pipeline.unet.named_modules():  # every bias and norm weight, as ComfyUI's LoraSave writes
        key = f"lora_unet_{name.replace('.', '_')}"
        if isinstance(module, torch.nn.GroupNorm | torch.nn.LayerNorm):
            tensors[f"{key}.diff"] = torch.randn(module.weight.shape, generator=generator) * 0.1
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d | torch.nn.GroupNorm | torch.nn.LayerNorm) and (
            module.bias is not None
        ):
            tensors[f"{key}.diff_b"] = torch.randn(module.bias.shape, generator=generator) * 0.1
    path = tmp_path / "lora.safetensors"
    save_file(tensors, path, header)
    snapshot = {name: {k: v.clone() for k, v in model.state_dict().items()} for name, model in models.items()}
    before = run_unet(pipeline.unet)
    upsampler = pipeline.unet.get_submodule("up_blocks.0.upsamplers.0")
    bias_before = upsampler.conv.bias.detach().clone()

    contents = pipeline.loras.read(path)
    assert {update.parameter for update in contents.updates} == {"weight", "bias"}
    pipeline.loras.apply(("diff",), [(contents.updates, 1.0)])
    assert (run_unet(pipeline.unet) - before).abs().max() > 1e-3
    assert not torch.equal(upsampler.conv.bias, bias_before)  # the sub-pixel path reads the conv's own bias

    pipeline.loras.restore()
    assert torch.equal(run_unet(pipeline.unet), before)
    for name, model in models.items():
        assert all(torch.equal(value, snapshot[name][key]) for key, value in model.state_dict().items()), name


def test_copies_are_kept_in_the_narrowest_dtype_that_holds_them_exactly():
    """A float32 weight that came from an fp16 file is copied in 16 bits; one with float32 detail (a fused LoRA) in
    32; both restore bit for bit."""
    from_file, fused = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        from_file.weight.copy_(from_file.weight.half().float())
        fused.weight.add_(1e-7)
    references = [layer.weight.detach().clone() for layer in (from_file, fused)]
    merger = LoraMerger({"text_encoder": torch.nn.Sequential(from_file, fused)})
    tensors = {"down": torch.randn(1, 8), "up": torch.randn(8, 1)}
    updates = [LayerUpdate("text_encoder", name, "lora", tensors) for name in ("0", "1")]
    assert merger.copy_bytes([(updates, 1.0)]) == 64 * 2 + 64 * 4
    merger.apply(("x",), [(updates, 1.0)])
    assert merger.copied_bytes() == 64 * 2 + 64 * 4
    assert [copy.dtype for copy in merger.originals.values()] == [torch.float16, torch.float32]
    merger.restore()
    for layer, reference in zip((from_file, fused), references, strict=True):
        assert torch.equal(layer.weight, reference)
