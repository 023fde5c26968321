"""The names LoRA files give SDXL's layers, and the layers they name.

A file names a layer by a component prefix and a module path. Paths may be diffusers' (`down_blocks.1.attentions.0...`)
or the single-file checkpoint's (SGM: `input_blocks.4.1...`), mapped through `sgm_unet_paths`, which follows the
UNet's config; a text encoder's paths come with and without transformers 4's `text_model.` level. Prefixes:

- kohya, LyCORIS through kohya, OneTrainer's kohya output, ai-toolkit: `lora_unet_`, `lora_te1_`, `lora_te2_`, the
  path's dots turned into underscores; SimpleTuner with LyCORIS: `lycoris_` (the UNet).
- diffusers and peft: `unet.`, `text_encoder.`, `text_encoder_2.`; peft's save_pretrained adds `base_model.model.`.
- single-file checkpoints' own keys (EriDiffusion v1): `model.diffusion_model.`, `conditioner.embedders.0.transformer.`.
- ComfyUI's saves and OneTrainer's ComfyUI output: `diffusion_model.`, `text_encoders.clip_l.transformer.`,
  `text_encoders.clip_g.transformer.`; OneTrainer's OMI format: `unet.` with SGM paths.
- none: Replicate's SDXL trainings (attention processors) and EriDiffusion v2 (SGM paths): the UNet.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

FLAT_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lycoris_": "unet"}
"""Flat prefixes: the module path follows with its dots turned into underscores."""

DOTTED_PREFIXES = {
    "unet.": "unet",
    "text_encoder.": "text_encoder",
    "text_encoder_2.": "text_encoder_2",
    "model.diffusion_model.": "unet",
    "diffusion_model.": "unet",
    "conditioner.embedders.0.transformer.": "text_encoder",
    "text_encoders.clip_l.transformer.": "text_encoder",
    "text_encoders.clip_g.transformer.": "text_encoder_2",
}
"""Component prefixes of dotted paths, the longest checked first."""

TARGET_LAYERS = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)
"""What a file can change: the weights of linear, convolution and embedding layers, and (by full differences) the
weights of normalisation layers and the biases of any of them."""

RESNET_SGM_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
"""Inside a resnet, SGM's names for diffusers' layers; attention blocks use the same names in both."""

FOREIGN_BASES = (
    (re.compile(r"double_blocks|single_blocks|single_transformer_blocks|img_attn|txt_attn"), "a Flux LoRA"),
    (re.compile(r"joint_blocks|context_block|x_block|\.attn\.add_q_proj"), "an SD 3 or Flux LoRA"),
    (re.compile(r"^lora_te_|down_blocks[._]0[._]attentions|input_blocks[._][12][._]1[._]"), "an SD 1.x/2.x LoRA"),
)
"""Names that only other base models have (SD 1.x/2.x have attention at the UNet's first level, SDXL does not)."""


def flat(path: str) -> str:
    return path.replace(".", "_")


def sgm_unet_paths(config: Mapping) -> dict[str, str]:
    """Block paths of the single-file (SGM) UNet mapped to diffusers', derived from the UNet's config.

    SGM numbers the UNet's blocks in one sequence per half (`input_blocks.N.M`, `output_blocks.N.M`): per level,
    layers_per_block (resnet, attention) pairs and a downsampler, and on the way up one more resnet per level and
    the upsampler beside the last one.
    """
    paths = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1",
        "label_emb.0.2": "add_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
        "middle_block.0": "mid_block.resnets.0",
        "middle_block.1": "mid_block.attentions.0",
        "middle_block.2": "mid_block.resnets.1",
    }
    levels = len(config["block_out_channels"])
    per_block = config["layers_per_block"]
    per_block = [per_block] * levels if isinstance(per_block, int) else list(per_block)
    index = 1
    for level, block_type in enumerate(config["down_block_types"]):
        for layer in range(per_block[level]):
            paths[f"input_blocks.{index}.0"] = f"down_blocks.{level}.resnets.{layer}"
            if "CrossAttn" in block_type:
                paths[f"input_blocks.{index}.1"] = f"down_blocks.{level}.attentions.{layer}"
            index += 1
        if level < levels - 1:
            paths[f"input_blocks.{index}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            index += 1
    index = 0
    for level, block_type in enumerate(config["up_block_types"]):
        layers = per_block[levels - 1 - level] + 1
        for layer in range(layers):
            paths[f"output_blocks.{index}.0"] = f"up_blocks.{level}.resnets.{layer}"
            attention = "CrossAttn" in block_type
            if attention:
                paths[f"output_blocks.{index}.1"] = f"up_blocks.{level}.attentions.{layer}"
            if layer == layers - 1 and level < levels - 1:
                paths[f"output_blocks.{index}.{2 if attention else 1}"] = f"up_blocks.{level}.upsamplers.0"
            index += 1
    return paths


def sgm_name(diffusers_name: str, blocks: Mapping[str, str]) -> str | None:
    """A diffusers UNet module's name in the single-file checkpoint, or None outside the mapped blocks."""
    for sgm, diffusers in blocks.items():
        if diffusers_name == diffusers:
            return sgm
        if diffusers_name.startswith(diffusers + "."):
            inner = diffusers_name[len(diffusers) + 1 :]
            if ".resnets." in diffusers or diffusers.startswith("mid_block.resnets"):
                inner = {v: k for k, v in RESNET_SGM_NAMES.items()}.get(inner, inner)
            return f"{sgm}.{inner}"
    return None


def aliases(name: str, blocks: Mapping[str, str]) -> set[str]:
    """The names files use for a module: a UNet's diffusers and SGM paths; a text encoder's paths with and without
    the `text_model.` level (files keep it; transformers 5's CLIPTextModel has none)."""
    if blocks:
        return {name} | ({sgm} if (sgm := sgm_name(name, blocks)) else set())
    return {name, name.removeprefix("text_model."), f"text_model.{name.removeprefix('text_model.')}"}


@dataclass
class Targets:
    """Every layer a LoRA can change, under each name a file may use for it."""

    modules: dict[tuple[str, str], nn.Module]
    dotted: dict[tuple[str, str], str] = field(default_factory=dict)
    """(component, path as written: diffusers or SGM) -> diffusers path."""
    flat: dict[str, tuple[str, str]] = field(default_factory=dict)
    """kohya name (prefix + path with _) -> (component, diffusers path)."""

    @classmethod
    def of(cls, models: Mapping[str, nn.Module]) -> Targets:
        targets = cls(modules={})
        for component, model in models.items():
            blocks = sgm_unet_paths(model.config) if component == "unet" else {}
            prefixes = [flat_prefix for flat_prefix, name in FLAT_PREFIXES.items() if name == component]
            for name, module in model.named_modules():
                if not isinstance(module, TARGET_LAYERS):
                    continue
                targets.modules[component, name] = module
                for alias in aliases(name, blocks):
                    targets.dotted[component, alias] = name
                    for prefix in prefixes:
                        targets.flat[prefix + flat(alias)] = (component, name)
        return targets

    def parameter(self, component: str, module: str, name: str) -> torch.Tensor | None:
        """A layer's weight or bias; None when the layer has no such parameter (a bias-free projection)."""
        value = getattr(self.modules[component, module], name, None)
        return value if isinstance(value, torch.Tensor) else None

    def resolve(self, path: str) -> tuple[str, str] | None:
        """(component, diffusers path) for a key's module part, or None if SDXL has no such layer."""
        path = path.removeprefix("base_model.model.")
        processor = re.fullmatch(r"(.*)\.processor\.(to_q|to_k|to_v|to_out)", path)
        if processor:
            path = f"{processor[1]}.{processor[2]}" + (".0" if processor[2] == "to_out" else "")
        for candidate in (path, path.removesuffix(".weight")):
            if candidate in self.flat:
                return self.flat[candidate]
            for prefix, component in sorted(DOTTED_PREFIXES.items(), key=lambda item: -len(item[0])):
                if candidate.startswith(prefix) and (component, candidate[len(prefix) :]) in self.dotted:
                    return component, self.dotted[component, candidate[len(prefix) :]]
            if ("unet", candidate) in self.dotted:  # no prefix: UNet-only files
                return "unet", self.dotted["unet", candidate]
        return None


def describe_foreign(keys: Iterable[str]) -> str:
    """What a file whose keys do not fit SDXL looks made for, in words."""
    keys = list(keys)
    for pattern, what in FOREIGN_BASES:
        if any(pattern.search(key) for key in keys):
            return what
    return "not an SDXL LoRA"
