"""LoRAs for SDXL: reading every common file layout, and merging into the weights with an exact restore.

One implementation serves the Flash-SDXL fuse at setup and the users' LoRAs at request time.

Why by hand: diffusers reads kohya, diffusers and peft files, but refuses LoHa and LoKr, drops DoRA with only a
warning, loads none of the EriDiffusion trainers' layouts, and applies LoRAs through peft wrappers (~1,400 extra
matmuls a step). Here each file becomes a list of `LayerUpdate`s, one per SDXL module, whatever its layout:

- peft / diffusers: `unet.<path>.lora_A.weight`, `.lora_B.weight`, alpha in the `lora_adapter_metadata` header;
  older diffusers: `.lora.down.weight` / `.lora.up.weight`, `text_encoder.<path>.lora_linear_layer.down.weight`,
  and attention processors `unet.<attention>.processor.to_q_lora.down.weight`.
- kohya / ComfyUI / LyCORIS: `lora_unet_<path with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`; `lora_te1_`
  and `lora_te2_` for the text encoders; LoHa `.hada_w1_a` ...; LoKr `.lokr_w1` ...; DoRA `.dora_scale`.
- EriDiffusion v2 (`train_sdxl`): `input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_A.weight` (SGM paths, no
  prefix) with `.alpha`, or with rank and alpha in the `__eridiffusion_ckpt__` header and `__opt__/` optimizer
  tensors beside; its `_comfyui` companion is kohya-style.
- EriDiffusion v1 (`checkpoint-{step}`): `<the base's own key>.lora_down.weight`, such as
  `model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight.lora_down.weight`, with rank and
  alpha in the header.

Paths may be diffusers' (`down_blocks.1.attentions.0...`) or the single-file checkpoint's (SGM: `input_blocks.4.1...`),
mapped through `sgm_unet_paths`, which follows the UNet's config.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..limits import MAX_LORA_TENSORS
from .header import LoraError, Metadata, finite_number
from .updates import LayerUpdate

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

FLAT_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
"""kohya's prefixes: the module path follows with its dots turned into underscores."""

DOTTED_PREFIXES = {
    "unet.": "unet",
    "text_encoder.": "text_encoder",
    "text_encoder_2.": "text_encoder_2",
    "model.diffusion_model.": "unet",
    "conditioner.embedders.0.transformer.": "text_encoder",
}
"""Component prefixes of diffusers files and of single-file (SGM) checkpoints' own keys."""

IGNORED_PREFIXES = ("__opt__/",)
"""Tensors that are not part of the LoRA: EriDiffusion's full-state checkpoints carry the optimizer's moments."""

ROLES = {
    ".lora_A.weight": ("lora", "down"),
    ".lora_B.weight": ("lora", "up"),
    ".lora_down.weight": ("lora", "down"),
    ".lora_up.weight": ("lora", "up"),
    ".lora_mid.weight": ("lora", "mid"),
    ".lora.down.weight": ("lora", "down"),
    ".lora.up.weight": ("lora", "up"),
    ".lora_linear_layer.down.weight": ("lora", "down"),
    ".lora_linear_layer.up.weight": ("lora", "up"),
    "_lora.down.weight": ("lora", "down"),  # attention processors: <attention>.processor.to_q_lora.down.weight
    "_lora.up.weight": ("lora", "up"),
    ".hada_w1_a": ("loha", "w1_a"),
    ".hada_w1_b": ("loha", "w1_b"),
    ".hada_w2_a": ("loha", "w2_a"),
    ".hada_w2_b": ("loha", "w2_b"),
    ".hada_t1": ("loha", "t1"),
    ".hada_t2": ("loha", "t2"),
    ".lokr_w1": ("lokr", "w1"),
    ".lokr_w1_a": ("lokr", "w1_a"),
    ".lokr_w1_b": ("lokr", "w1_b"),
    ".lokr_w2": ("lokr", "w2"),
    ".lokr_w2_a": ("lokr", "w2_a"),
    ".lokr_w2_b": ("lokr", "w2_b"),
    ".lokr_t2": ("lokr", "t2"),
    ".alpha": (None, "alpha"),
    ".dora_scale": (None, "magnitude"),
    ".lora_magnitude_vector": (None, "magnitude"),
    ".lora_magnitude_vector.weight": (None, "magnitude"),
}
"""Key endings and what each tensor is: (kind of update, role in it)."""

UNSUPPORTED_ROLES = {
    ".lora_A.bias": "LoRA biases",
    ".lora_B.bias": "LoRA biases",
    ".lora_up.bias": "LoRA biases",
    ".diff": "full weight differences (LyCORIS 'full')",
    ".diff_b": "full weight differences (LyCORIS 'full')",
    ".oft_blocks": "OFT",
    ".oft_diag": "OFT",
    ".bias_indices": "LyCORIS sparse biases",
}

DECOMPOSITIONS = {
    "mid": "LoCon with Tucker decomposition (lora_mid)",
    "t1": "LoHa with Tucker decomposition (hada_t1)",
    "t2": "LoHa or LoKr with Tucker decomposition (hada_t2, lokr_t2)",
}

REQUIRED_ROLES: dict[str, tuple[tuple[frozenset[str], ...], ...]] = {
    "lora": ((frozenset({"down"}),), (frozenset({"up"}),)),
    "loha": ((frozenset({"w1_a", "w1_b"}),), (frozenset({"w2_a", "w2_b"}),)),
    "lokr": ((frozenset({"w1"}), frozenset({"w1_a", "w1_b"})), (frozenset({"w2"}), frozenset({"w2_a", "w2_b"}))),
}
"""The tensors each kind of update needs: every group must be present, in one of its forms."""

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
    """Every weight a LoRA can change, under each name a file may use for it."""

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
            prefix = next(flat_prefix for flat_prefix, name in FLAT_PREFIXES.items() if name == component)
            for name, module in model.named_modules():
                if not isinstance(module, nn.Linear | nn.Conv2d):
                    continue
                targets.modules[component, name] = module
                for alias in aliases(name, blocks):
                    targets.dotted[component, alias] = name
                    targets.flat[prefix + flat(alias)] = (component, name)
        return targets

    def resolve(self, path: str) -> tuple[str, str] | None:
        """(component, diffusers path) for a key's module part, or None if SDXL has no such layer."""
        path = path.removeprefix("base_model.model.")
        processor = re.fullmatch(r"(.*)\.processor\.(to_q|to_k|to_v|to_out)", path)
        if processor:
            path = f"{processor[1]}.{processor[2]}" + (".0" if processor[2] == "to_out" else "")
        for candidate in (path, path.removesuffix(".weight")):
            if candidate in self.flat:
                return self.flat[candidate]
            for prefix, component in DOTTED_PREFIXES.items():
                if candidate.startswith(prefix) and (component, candidate[len(prefix) :]) in self.dotted:
                    return component, self.dotted[component, candidate[len(prefix) :]]
            if ("unet", candidate) in self.dotted:  # no prefix: UNet-only files
                return "unet", self.dotted["unet", candidate]
        return None


def split_key(key: str) -> tuple[str, str, str | None]:
    """(module part, role, kind) of a tensor's key; the longest matching ending wins."""
    for ending in sorted(UNSUPPORTED_ROLES, key=len, reverse=True):
        if key.endswith(ending):
            raise LoraError(f"{UNSUPPORTED_ROLES[ending]} ({key}) are not supported; use a LoRA, LoHa, LoKr or DoRA")
    for ending in sorted(ROLES, key=len, reverse=True):
        if key.endswith(ending):
            kind, role = ROLES[ending]
            return key[: -len(ending)], role, kind
    raise LoraError(f"{key} is not a LoRA tensor (no lora_A/lora_B, lora_down/lora_up, hada_ or lokr_ key)")


def describe_foreign(keys: Iterable[str]) -> str:
    """What a file whose keys do not fit SDXL looks made for, in words."""
    keys = list(keys)
    for pattern, what in FOREIGN_BASES:
        if any(pattern.search(key) for key in keys):
            return what
    return "not an SDXL LoRA"


Plan = dict[tuple[str, str], dict[str, str]]
"""(component, module) -> {role: the file's key of that tensor}."""


def plan_keys(keys: Iterable[str], targets: Targets) -> tuple[Plan, dict[tuple[str, str], set[str]]]:
    """Each key's module, role and kind of update, from the names alone, so that a file that does not fit SDXL is
    refused before any of its tensors is read. Also returns the kinds of update found for each module."""
    plan: Plan = {}
    kinds: dict[tuple[str, str], set[str]] = {}
    unknown: list[str] = []
    for key in keys:
        if key.startswith(IGNORED_PREFIXES):
            continue
        module_part, role, kind = split_key(key)
        target = targets.resolve(module_part)
        if target is None:
            unknown.append(key)
            continue
        plan.setdefault(target, {})[role] = key
        if kind:
            kinds.setdefault(target, set()).add(kind)
    if unknown:
        what = describe_foreign(unknown)
        share = "none" if not plan else f"{len(unknown)} of {len(unknown) + sum(map(len, plan.values()))}"
        raise LoraError(f"{what}: {share} of its tensors fit an SDXL layer (such as {sorted(unknown)[0]})")
    if not plan:
        raise LoraError("the file holds no LoRA tensors")
    return plan, kinds


def finite(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of the file, refused when it holds NaN or infinity (one would spread through every picture)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise LoraError(f"{key} holds NaN or infinite values, so the file is damaged")
    return tensor


def parse_lora(
    tensors: Mapping[str, torch.Tensor], header: Mapping[str, str] | None, targets: Targets
) -> list[LayerUpdate]:
    """Turn a file's tensors into one update per SDXL module, or refuse the whole file in one line.

    Never a partial load: a key whose module SDXL lacks, a half pair, a value that is not finite, or a shape that does
    not fit stops it all.
    """
    plan, kinds = plan_keys(tensors, targets)
    return build_updates(plan, kinds, tensors, Metadata(header), targets)


def build_updates(
    plan: Plan,
    kinds: dict[tuple[str, str], set[str]],
    tensors: Mapping[str, torch.Tensor],
    metadata: Metadata,
    targets: Targets,
) -> list[LayerUpdate]:
    updates = []
    for target, roles in plan.items():
        checked = {role: finite(key, tensors[key]) for role, key in roles.items()}
        updates.append(_layer_update(target, checked, kinds.get(target, set()), metadata))
    for update in updates:
        weight = targets.modules[update.component, update.module].weight
        expected = (weight.shape[0], weight[0].numel())
        if update.product_shape() != expected:
            found = update.product_shape()
            raise LoraError(
                f"{describe_foreign(tensors).replace('not an SDXL LoRA', 'made for another base model')}: its"
                f" {update.component} layer {update.module} maps {found[1]} to {found[0]} features, SDXL's maps"
                f" {expected[1]} to {expected[0]}"
            )
    return sorted(updates, key=lambda update: (update.component, update.module))


def _layer_update(
    target: tuple[str, str], roles: dict[str, torch.Tensor], kinds: set[str], metadata: Metadata
) -> LayerUpdate:
    component, module = target
    if len(kinds) != 1:
        found = ", ".join(sorted(kinds)) or "only an alpha or scale"
        raise LoraError(f"{component} layer {module} has {found}: not one complete LoRA, LoHa or LoKr update")
    [kind] = kinds
    for role, description in DECOMPOSITIONS.items():
        if role in roles:
            raise LoraError(f"{description} ({component} layer {module}) is not supported")
    missing = [
        " or ".join("+".join(sorted(option)) for option in options)
        for options in REQUIRED_ROLES[kind]
        if not any(option <= roles.keys() for option in options)
    ]
    if missing:
        raise LoraError(f"{component} layer {module} lacks {', '.join(missing)}: the file is incomplete")
    alpha_tensor = roles.pop("alpha", None)
    magnitude = roles.pop("magnitude", None)
    if alpha_tensor is not None and alpha_tensor.numel() == 0:
        raise LoraError(f"the alpha of {component} layer {module} is an empty tensor")
    alpha = metadata.alpha(component, module)
    if alpha_tensor is not None:
        alpha = finite_number(f"the alpha of {component} layer {module}", alpha_tensor.flatten()[0].item())
    return LayerUpdate(
        component=component,
        module=module,
        kind=kind,
        tensors=roles,
        alpha=alpha,
        magnitude=magnitude,
        rank_stabilised=metadata.rank_stabilised(component),
    )


def read_lora(path: Path, targets: Targets) -> list[LayerUpdate]:
    """Read a LoRA file for the given SDXL modules, reading only what it needs: the header's names are resolved and
    its fields checked before any tensor is made, and only the tensors of the plan are read (safetensors only:
    nothing here can run code)."""
    try:
        with safe_open(str(path), framework="pt") as file:
            keys = list(file.keys())
            if len(keys) > MAX_LORA_TENSORS:
                raise LoraError(f"the file lists {len(keys):,} tensors; an SDXL LoRA has at most {MAX_LORA_TENSORS:,}")
            metadata = Metadata(file.metadata() or {})
            plan, kinds = plan_keys(keys, targets)
            tensors = {key: file.get_tensor(key) for roles in plan.values() for key in roles.values()}
    except (SafetensorError, OSError, ValueError) as error:
        if isinstance(error, LoraError):
            raise
        raise LoraError(f"not a readable safetensors file ({str(error).splitlines()[0][:120]})") from None
    return build_updates(plan, kinds, tensors, metadata, targets)
