"""LoRA files for the tests, on the tiny weights' modules, and the UNet run they should give."""

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_RANK = 4


def lora_targets(unet: torch.nn.Module) -> list[str]:
    """The attention projections Flash-SDXL trains (to_q, to_k, to_v, to_out.0 of every attention block)."""
    return [
        name
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS) and ".attn" in name
    ]


def random_lora(unet: torch.nn.Module, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(down, up) per target module, big enough to change the UNet's output clearly."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    lora = {}
    for name in lora_targets(unet):
        weight = modules[name].weight
        down = torch.randn(LORA_RANK, weight.shape[1], generator=generator) * 0.1
        up = torch.randn(weight.shape[0], LORA_RANK, generator=generator) * 0.1
        lora[name] = (down, up)
    return lora


def lora_tensors(lora: dict, style: str, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """The LoRA in one of the key styles diffusers reads; kohya files carry an alpha per layer."""
    tensors = {}
    for module, (down, up) in lora.items():
        if style == "peft":
            tensors |= {f"unet.{module}.lora_A.weight": down, f"unet.{module}.lora_B.weight": up}
        elif style == "diffusers":
            tensors |= {f"unet.{module}.lora.down.weight": down, f"unet.{module}.lora.up.weight": up}
        else:
            prefix = "lora_unet_" + module.replace(".", "_")
            tensors |= {f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up}
            tensors[f"{prefix}.alpha"] = torch.tensor(float(alpha if alpha is not None else LORA_RANK))
    return {key: value.contiguous() for key, value in tensors.items()}


def unet_inputs(unet: UNet2DConditionModel) -> dict:
    generator = torch.Generator().manual_seed(1)
    config = unet.config
    text_embeds_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {
        "sample": torch.randn(1, 4, 8, 8, generator=generator),
        "timestep": torch.tensor(759),
        "encoder_hidden_states": torch.randn(1, 77, config.cross_attention_dim, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(1, text_embeds_dim, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        },
    }


def run_unet(unet: UNet2DConditionModel) -> torch.Tensor:
    with torch.inference_mode():
        return unet(**unet_inputs(unet)).sample


def run_with_lora_hooks(unet: UNet2DConditionModel, lora: dict, scale: float) -> torch.Tensor:
    """The LoRA applied at run time, by hand: y = W x + b + scale * up(down(x)) on every target layer."""
    modules = dict(unet.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda module, args, output, down=down, up=up: output + scale * F.linear(F.linear(args[0], down), up)
        )
        for name, (down, up) in lora.items()
    ]
    try:
        return run_unet(unet)
    finally:
        for handle in handles:
            handle.remove()
