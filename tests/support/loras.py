"""LoRA files for the tests, on the tiny weights' modules, in every layout models/loras reads, and the merged
weights they should give according to peft (an implementation independent of ours)."""

import copy
import io
import json
import tarfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from safetensors.torch import save

from models.loras.names import flat, sgm_name, sgm_unet_paths
from tests.support.unet import run_unet

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_RANK = 4

TARGETS = {
    "unet": (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
        "mid_block.attentions.0.transformer_blocks.1.attn1.to_out.0",
        "mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj",
        "up_blocks.1.attentions.1.proj_in",
        "down_blocks.0.resnets.0.time_emb_proj",
        "mid_block.resnets.1.conv1",
        "up_blocks.0.upsamplers.0.conv",
    ),
    "text_encoder": ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"),
    "text_encoder_2": ("text_model.encoder.layers.0.self_attn.v_proj",),
}
"""Attention projections (self and cross, so fused QKV), feed-forward, a resnet's convolution and time projection, the
upsampler that the sub-pixel fold reads, and both text encoders."""

LINEAR_UNET = {"unet": tuple(name for name in TARGETS["unet"] if ".attentions." in name)}
ATTENTION_PROJECTIONS = {"unet": tuple(name for name in TARGETS["unet"] if name.endswith(LORA_TARGETS))}


@dataclass
class Reference:
    """A random adapter on some modules, as peft holds it, and the weights peft merges it into."""

    kind: str
    adapters: dict[tuple[str, str], dict[str, torch.Tensor]]
    """(component, module) -> the adapter's tensors, named as LyCORIS names them, plus "alpha"."""
    merged: dict[tuple[str, str], torch.Tensor]


def reference(models: dict, kind: str, targets: dict, seed: int = 0, dora: bool = False) -> Reference:
    """A peft adapter of one kind with random weights on the targets; what it merges to, per module."""
    torch.manual_seed(seed)
    adapters, merged = {}, {}
    for component, names in targets.items():
        model = copy.deepcopy(models[component])
        if kind == "lora":
            config = LoraConfig(
                r=LORA_RANK, lora_alpha=6, target_modules=list(names), init_lora_weights=False, use_dora=dora
            )
        elif kind == "loha":
            config = LoHaConfig(r=LORA_RANK, alpha=6, target_modules=list(names), init_weights=False)
        else:  # a rank small enough that the second factor is decomposed, as LyCORIS files have it
            config = LoKrConfig(r=1, alpha=3, target_modules=list(names), init_weights=False, decompose_factor=4)
        inject_adapter_in_model(config, model)
        modules = dict(model.named_modules())
        for name in names:
            layer = modules[name]
            if dora:  # peft starts the magnitude at the weight's norm, which would make DoRA a plain LoRA
                with torch.no_grad():
                    layer.lora_magnitude_vector["default"].weight.mul_(1.0 + 0.2 * torch.rand_like(
                        layer.lora_magnitude_vector["default"].weight))  # fmt: skip
            adapters[component, name] = adapter_tensors(layer, kind)
            layer.merge()
            merged[component, name] = layer.get_base_layer().weight.detach().clone()
    return Reference(kind, adapters, merged)


def adapter_tensors(layer, kind: str) -> dict[str, torch.Tensor]:
    if kind == "lora":
        tensors = {"down": layer.lora_A["default"].weight, "up": layer.lora_B["default"].weight}
        rank = tensors["down"].shape[0]
        if "default" in layer.lora_magnitude_vector:
            out = layer.get_base_layer().weight.shape[0]
            tensors["magnitude"] = layer.lora_magnitude_vector["default"].weight.reshape(out, 1)
    else:
        names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if kind == "loha" else (
            "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")  # fmt: skip
        tensors = {name: getattr(layer, name)["default"] for name in names if "default" in getattr(layer, name)}
        rank = tensors["hada_w1_b" if kind == "loha" else "lokr_w2_b"].shape[0]
    tensors = {name: tensor.detach().clone().contiguous() for name, tensor in tensors.items()}
    tensors["alpha"] = torch.tensor(float(layer.scaling["default"] * rank))
    return tensors


KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
DIFFUSERS_PREFIX = {"unet": "unet.", "text_encoder": "text_encoder.", "text_encoder_2": "text_encoder_2."}


def te_path(component: str, module: str) -> str:
    """Text encoder paths as files write them: under text_model. (transformers 5's CLIPTextModel has no such level)."""
    return module if component == "unet" or module.startswith("text_model.") else f"text_model.{module}"


def write_layout(reference: Reference, layout: str, unet_config) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The reference adapter as the tensors and header of one file layout."""
    blocks = sgm_unet_paths(unet_config)
    tensors: dict[str, torch.Tensor] = {}
    header: dict[str, str] = {"format": "pt"}
    ranks = {}
    for (component, module), adapter in reference.adapters.items():
        path = te_path(component, module)
        sgm = sgm_name(module, blocks) if component == "unet" else None
        down, up, alpha = adapter.get("down"), adapter.get("up"), adapter["alpha"]
        ranks[component] = (down.shape[0] if down is not None else None, float(alpha))
        if layout == "peft":
            key = f"{DIFFUSERS_PREFIX[component]}{path}"
            tensors |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}
            if "magnitude" in adapter:
                tensors[f"{key}.lora_magnitude_vector"] = adapter["magnitude"].flatten()
        elif layout == "diffusers-old":  # alpha = rank: these files carry none
            key = f"{DIFFUSERS_PREFIX[component]}{path}"
            infix = ".lora" if component == "unet" else ".lora_linear_layer"
            tensors |= {f"{key}{infix}.down.weight": down, f"{key}{infix}.up.weight": up}
        elif layout == "attention-processor":
            attention, _, projection = module.rpartition(".to_")
            projection = projection.removesuffix(".0")
            key = f"unet.{attention}.processor.to_{projection}_lora"
            tensors |= {f"{key}.down.weight": down, f"{key}.up.weight": up}
        elif layout in ("kohya", "kohya-sgm"):
            key = KOHYA_PREFIX[component] + flat(sgm if layout == "kohya-sgm" and sgm else path)
            if reference.kind == "lora":
                tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
                if "magnitude" in adapter:
                    tensors[f"{key}.dora_scale"] = adapter["magnitude"]
            else:
                tensors |= {f"{key}.{name}": value for name, value in adapter.items() if name != "alpha"}
            tensors[f"{key}.alpha"] = alpha
        elif layout == "eridiffusion-v2":  # train_sdxl's weights-only save: SGM paths, no prefix, alpha tensors
            tensors |= {f"{sgm}.lora_A.weight": down.float(), f"{sgm}.lora_B.weight": up.float(), f"{sgm}.alpha": alpha}
        elif layout == "eridiffusion-v2-full":  # its full-state checkpoint: optimizer moments, alpha in the header
            tensors |= {f"{sgm}.lora_A.weight": down.float(), f"{sgm}.lora_B.weight": up.float()}
            tensors |= {f"__opt__/adamw/{moment}/{sgm}.lora_A.weight": torch.zeros_like(down) for moment in "mv"}
        elif layout == "eridiffusion-v2-lycoris":
            tensors |= {f"{sgm}.{name}": value.float() for name, value in adapter.items() if name != "alpha"}
            tensors[f"{sgm}.alpha"] = alpha
        elif layout == "eridiffusion-v1-sgm":  # checkpoint-{step}: the base checkpoint's own key, .weight and all
            key = f"model.diffusion_model.{sgm}.weight"
            tensors |= {f"{key}.lora_down.weight": down.float(), f"{key}.lora_up.weight": up.float()}
        elif layout == "eridiffusion-v1-diffusers":
            tensors |= {
                f"{module}.weight.lora_down.weight": down.float(),
                f"{module}.weight.lora_up.weight": up.float(),
            }
        else:
            raise ValueError(layout)
    rank, alpha = next(iter(ranks.values()))
    if layout == "peft":
        adapter_metadata = {}
        for component, (component_rank, component_alpha) in ranks.items():
            adapter_metadata |= {f"{component}.r": component_rank, f"{component}.lora_alpha": component_alpha}
            adapter_metadata[f"{component}.use_dora"] = any("magnitude" in a for a in reference.adapters.values())
        header["lora_adapter_metadata"] = json.dumps(adapter_metadata)
    elif layout == "eridiffusion-v2-full":
        header["__eridiffusion_ckpt__"] = json.dumps(
            {
                "format_version": 1,
                "trainer": "train_sdxl",
                "step": 10,
                "optimizer": "adamw",
                "rank": rank,
                "alpha": alpha,
            }
        )
    elif layout.startswith("eridiffusion-v1"):
        header |= {"rank": str(rank), "alpha": str(int(alpha) if alpha.is_integer() else alpha)}
    return {key: value.contiguous() for key, value in tensors.items()}, header


LAYOUTS = {
    # layout: (kind, targets, alpha forced to the rank because the layout carries none)
    "peft": ("lora", TARGETS, False),
    "diffusers-old": ("lora", TARGETS, True),
    "attention-processor": ("lora", ATTENTION_PROJECTIONS, True),
    "kohya": ("lora", TARGETS, False),
    "kohya-sgm": ("lora", TARGETS, False),
    "eridiffusion-v2": ("lora", LINEAR_UNET, False),
    "eridiffusion-v2-full": ("lora", LINEAR_UNET, False),
    "eridiffusion-v1-sgm": ("lora", LINEAR_UNET, False),
    "eridiffusion-v1-diffusers": ("lora", LINEAR_UNET, False),
}


def lora_file(models: dict, layout: str, seed: int = 0, kind: str | None = None, dora: bool = False, targets=None):
    """(tensors, header, reference) of a random adapter written in one layout."""
    default_kind, default_targets, alpha_is_rank = LAYOUTS.get(layout, ("lora", TARGETS, False))
    ref = reference(models, kind or default_kind, targets or default_targets, seed, dora)
    if alpha_is_rank:  # rescale peft's merge to alpha = rank: merged = W + up @ down
        for target, adapter in ref.adapters.items():
            weight = models[target[0]].get_submodule(target[1]).weight
            delta = (adapter["up"].flatten(1) @ adapter["down"].flatten(1)).reshape(weight.shape)
            ref.merged[target] = weight.detach() + delta
    tensors, header = write_layout(ref, layout, models["unet"].config)
    return tensors, header, ref


def random_lora(unet: torch.nn.Module, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(down, up) per attention projection of the UNet, big enough to change its output clearly."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS) and ".attn" in name:
            down = torch.randn(LORA_RANK, module.weight.shape[1], generator=generator) * 0.1
            up = torch.randn(module.weight.shape[0], LORA_RANK, generator=generator) * 0.1
            lora[name] = (down, up)
    return lora


def lora_tensors(lora: dict, style: str, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """A random_lora in peft's or kohya's key style; kohya files carry an alpha per layer."""
    tensors = {}
    for module, (down, up) in lora.items():
        if style == "peft":
            tensors |= {f"unet.{module}.lora_A.weight": down, f"unet.{module}.lora_B.weight": up}
        else:
            prefix = "lora_unet_" + module.replace(".", "_")
            tensors |= {f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up}
            tensors[f"{prefix}.alpha"] = torch.tensor(float(alpha if alpha is not None else LORA_RANK))
    return {key: value.contiguous() for key, value in tensors.items()}


def run_with_lora_hooks(unet: UNet2DConditionModel, lora: dict, scale: float) -> torch.Tensor:
    """A random_lora applied at run time, by hand: y = W x + b + scale * up(down(x)) on every target layer."""
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


def tar_of(files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    """A plain .tar of the files, as Replicate's trainings ship them, and of symbolic links (name -> target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


def trained_tokens(widths: tuple[int, int], count: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Replicate training's embeddings.pti tensors: `count` new tokens for each text encoder."""
    generator = torch.Generator().manual_seed(seed)
    return {f"text_encoders_{index}": torch.randn(count, width, generator=generator) for index, width in
            enumerate(widths)}  # fmt: skip


def training_tar(lora: bytes, embeddings: dict[str, torch.Tensor] | None, words: dict | None = None) -> bytes:
    """A Replicate SDXL training's .tar: lora.safetensors, embeddings.pti (safetensors) and special_params.json."""
    files = {"lora.safetensors": lora}
    if embeddings is not None:
        files["embeddings.pti"] = save(embeddings)
        count = next(iter(embeddings.values())).shape[0]
        files["special_params.json"] = json.dumps(
            words or {"TOK": "".join(f"<s{index}>" for index in range(count))}
        ).encode()
    return tar_of(files)
