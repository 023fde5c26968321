"""The LoRA being trained: low-rank adapters beside the attention projections, and the kohya file they make.

Written here rather than taken from peft: the adapter is twenty lines (`LoraLinear`), peft would be a dependency of
the image for them, and its saved names would still need converting to the kohya layout this project, diffusers and
ComfyUI all read. The file names each layer as kohya's sd-scripts do for SDXL: `lora_unet_` and the single-file (SGM)
path with underscores (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), `lora_te1_`/`lora_te2_` and the
text model's path, with `.lora_down.weight`, `.lora_up.weight` and `.alpha`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..loras.names import flat, sgm_name, sgm_unet_paths

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""The UNet's attention projections (self- and cross-attention), as diffusers' and kohya's SDXL LoRA scripts adapt."""
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


class LoraLinear(nn.Module):
    """A frozen linear layer plus `up @ down * alpha / rank`, its factors kept in float32 (on a GPU, bf16 autocast
    computes the update in bf16); `up` starts at zero, so training starts from the base model exactly."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        device = base.weight.device
        down = torch.empty(rank, base.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)  # what nn.Linear and kohya use
        self.down = nn.Parameter(down.to(device))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32, device=device))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(inputs, self.down), self.up) * (self.alpha / self.rank)
        return self.base(inputs) + update.to(inputs.dtype)


def is_target(name: str, module: nn.Module, targets: tuple[str, ...]) -> bool:
    return isinstance(module, nn.Linear) and any(name.endswith("." + target) for target in targets)


def adapted_layers(component: str, model: nn.Module) -> list[str]:
    """The layers a training adapts, in the model's own order: the UNet's attention projections; a text encoder's,
    except the first encoder's last layer, whose output SDXL never reads (it takes that encoder's penultimate states),
    so that an adapter there would never learn."""
    if component == "unet":
        return [name for name, module in model.named_modules() if is_target(name, module, UNET_TARGETS)]
    unread = f"encoder.layers.{model.config.num_hidden_layers - 1}." if component == "text_encoder" else None
    return [name for name, module in model.named_modules()
            if is_target(name, module, TEXT_TARGETS) and not (unread and name.startswith(unread))]  # fmt: skip


def add_adapters(component: str, model: nn.Module, rank: int, alpha: float, generator: torch.Generator
                 ) -> dict[str, LoraLinear]:  # fmt: skip
    """Put a LoraLinear in place of each adapted layer, in the model's own order (so one seed gives one start)."""
    adapters = {}
    for name in adapted_layers(component, model):
        module = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        adapter = LoraLinear(module, rank, alpha, generator)
        setattr(model.get_submodule(parent_name), child, adapter)
        adapters[name] = adapter
    return adapters


def kohya_name(component: str, name: str, blocks: dict[str, str]) -> str:
    """The file's name for a layer: the SGM path for the UNet, the text model's path for a text encoder."""
    if component == "unet":
        path = sgm_name(name, blocks)
        if path is None:
            raise ValueError(f"{name} has no single-file name")
    else:
        path = "text_model." + name.removeprefix("text_model.")
    return PREFIXES[component] + flat(path)


def lora_tensors(adapters: dict[str, dict[str, LoraLinear]], unet_config: dict, dtype: torch.dtype = torch.float16
                 ) -> dict[str, torch.Tensor]:  # fmt: skip
    """Every adapter's down, up and alpha under its kohya name, in `dtype` (fp16, as kohya writes them)."""
    blocks = sgm_unet_paths(unet_config)
    tensors = {}
    for component, layers in adapters.items():
        for name, adapter in layers.items():
            key = kohya_name(component, name, blocks)
            tensors[f"{key}.lora_down.weight"] = adapter.down.detach().to("cpu", dtype).contiguous()
            tensors[f"{key}.lora_up.weight"] = adapter.up.detach().to("cpu", dtype).contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(adapter.alpha), dtype=dtype)
    return tensors
