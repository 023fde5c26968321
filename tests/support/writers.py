"""The files 23 SDXL LoRA trainers and tools write, as key lists with tensors of the right shapes, for full-size SDXL.

Each writer is its naming rule (prefix, block naming, tensor endings), the layers it adapts and the kind of update it
stores, read from its own source (kohya sd-scripts networks/lora.py, LyCORIS kohya.py and its modules, SimpleTuner's
LyCORIS presets, diffusers' training scripts and save_lora_weights, peft save_pretrained, replicate/cog-sdxl,
OneTrainer's legacy, kohya, ComfyUI and OMI savers, ai-toolkit, ComfyUI's LoraSave). The layers come from SDXL's own
modules on the meta device; the tensors are real but of rank 1 or 2, so a whole file is a few megabytes. Block names
in SGM form come from `sgm_name`, whose mapping is checked against diffusers' single-file converter in
tests/loras/test_names.py.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from models.loras.names import TARGET_LAYERS, flat, sgm_name, sgm_unet_paths

ATTENTION = (".to_q", ".to_k", ".to_v", ".to_out.0")
FEED_FORWARD = (".ff.net.0.proj", ".ff.net.2")
PROJECTIONS = (".proj_in", ".proj_out")
TEXT_LAYERS = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")
RESNET = (".conv1", ".conv2", ".time_emb_proj", ".conv_shortcut")
SAMPLERS = ("samplers.0.conv",)
EMBEDDINGS = ("time_embedding.linear_1", "time_embedding.linear_2", "add_embedding.linear_1", "add_embedding.linear_2")
OUTER = ("conv_in", "conv_out")
TEXT_PROJECTION = ("text_projection",)

TRANSFORMER = ATTENTION + FEED_FORWARD + PROJECTIONS
"""What kohya adapts by default in the UNet: every linear layer of its Transformer2DModel blocks."""
KOHYA_CONV = TRANSFORMER + RESNET + SAMPLERS
"""kohya with conv_dim: the resnets (3x3 convs, emb_layers, skip_connection) and down/upsamplers too."""
FULL = KOHYA_CONV + EMBEDDINGS + OUTER
"""OneTrainer's "full" preset, ai-toolkit and ComfyUI: every linear and convolution layer of the UNet."""

FLAT = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
DIFFUSERS = {"unet": "unet.", "text_encoder": "text_encoder.", "text_encoder_2": "text_encoder_2."}
COMFY = {"unet": "diffusion_model.", "text_encoder": "text_encoders.clip_l.transformer.",
         "text_encoder_2": "text_encoders.clip_g.transformer."}  # fmt: skip


@dataclass
class Written:
    """A writer's file: tensors and header, and what reading it must give."""

    tensors: dict[str, torch.Tensor]
    header: dict[str, str]
    layers: dict[str, int]
    """Updates expected per component."""
    kinds: set[str]
    scaling: float
    """The writer's own scale of every update: alpha / rank, 1 where it stores no alpha."""
    dora: bool = False


def selected(models: dict[str, nn.Module], endings: dict[str, tuple[str, ...]]) -> list[tuple[str, str, nn.Module]]:
    """(component, diffusers name, module) of the layers whose names end as given, per component."""
    found = []
    for component, component_endings in endings.items():
        for name, module in models[component].named_modules():
            if isinstance(module, nn.Linear | nn.Conv2d | nn.Embedding) and name.endswith(component_endings):
                found.append((component, name, module))
    return found


def text_path(component: str, name: str, transformers_4: bool = True) -> str:
    """A text encoder's module path as files write it: under text_model. (transformers 4), or without it (5)."""
    bare = name.removeprefix("text_model.")
    return f"text_model.{bare}" if transformers_4 and name != "text_projection" else bare


def path_of(component: str, name: str, models: dict, sgm: bool) -> str:
    if component != "unet":
        return text_path(component, name)
    return sgm_name(name, sgm_unet_paths(models["unet"].config)) if sgm else name


def in_out(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(in features, out features, kernel) of a layer; an embedding maps its width to its rows."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels, tuple(module.kernel_size)
    if isinstance(module, nn.Embedding):
        return module.embedding_dim, module.num_embeddings, ()
    return module.in_features, module.out_features, ()


def small(*shape: int) -> torch.Tensor:
    return torch.randn(*shape) * 0.01


def lora_tensors(module: nn.Module, rank: int, dora: str | None = None) -> dict[str, torch.Tensor]:
    """down [rank, in, *kernel], up [out, rank, 1, 1] for a conv, as kohya stores them; DoRA's magnitude per output
    or per input channel."""
    features_in, features_out, kernel = in_out(module)
    ones = (1,) * len(kernel)
    tensors = {"down": small(rank, features_in, *kernel), "up": small(features_out, rank, *ones)}
    if dora == "output":
        tensors["magnitude"] = torch.rand(features_out, 1) + 0.5
    elif dora == "input":
        tensors["magnitude"] = torch.rand(1, features_in) + 0.5
    return tensors


def loha_tensors(module: nn.Module, rank: int, four_d: bool) -> dict[str, torch.Tensor]:
    """LyCORIS flattens a conv's factors to 2-D; OneTrainer keeps them 4-D."""
    features_in, features_out, kernel = in_out(module)
    taps = int(torch.tensor(kernel).prod()) if kernel else 1
    columns = (features_in, *kernel) if four_d and kernel else (features_in * taps,)
    rows = (features_out, rank, 1, 1) if four_d and kernel else (features_out, rank)
    return {"hada_w1_a": small(*rows), "hada_w1_b": small(rank, *columns),
            "hada_w2_a": small(*rows), "hada_w2_b": small(rank, *columns)}  # fmt: skip


def factor(size: int) -> int:
    return next(candidate for candidate in (4, 2, 1) if size % candidate == 0)


def lokr_tensors(module: nn.Module, rank: int | None) -> dict[str, torch.Tensor]:
    """A Kronecker product: a full small factor w1, and w2 decomposed at rank (LyCORIS) or full (SimpleTuner)."""
    features_in, features_out, kernel = in_out(module)
    rows, columns = factor(features_out), factor(features_in)
    second_out, second_in = features_out // rows, features_in // columns
    tensors = {"lokr_w1": small(rows, columns)}
    if rank is None:
        tensors["lokr_w2"] = small(second_out, second_in, *kernel)
    else:
        tensors |= {"lokr_w2_a": small(second_out, rank), "lokr_w2_b": small(rank, second_in, *kernel)}
    return tensors


Names = Callable[[str, str], str]
"""(component, diffusers name) -> the module part of the file's keys."""

ENDINGS = {
    "kohya": {"down": ".lora_down.weight", "up": ".lora_up.weight", "alpha": ".alpha", "magnitude": ".dora_scale"},
    "peft": {"down": ".lora_A.weight", "up": ".lora_B.weight", "alpha": ".alpha",
             "magnitude": ".lora_magnitude_vector"},
    "diffusers-unet": {"down": ".lora.down.weight", "up": ".lora.up.weight", "magnitude": ".lora_magnitude_vector"},
    "diffusers-text": {"down": ".lora_linear_layer.down.weight", "up": ".lora_linear_layer.up.weight",
                       "magnitude": ".lora_magnitude_vector"},
    "processor": {"down": ".down.weight", "up": ".up.weight"},
}  # fmt: skip


def write(
    models: dict,
    endings: dict[str, tuple[str, ...]],
    names: Names,
    kind: str = "lora",
    style: Callable[[str], str] = lambda component: "kohya",
    rank: int | None = 2,
    alpha: float | None = None,
    dora: str | None = None,
    four_d: bool = False,
    header: dict[str, str] | None = None,
    scaling: float | None = None,
) -> Written:
    """One writer's file: for each selected layer, the tensors of one update of its kind under the writer's names."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, int] = {}
    for component, name, module in selected(models, endings):
        base = names(component, name)
        layers[component] = layers.get(component, 0) + 1
        if kind == "lora":
            made = lora_tensors(module, rank, dora)
            role_endings = ENDINGS[style(component)]
            if dora is not None and style(component) != "kohya":  # peft's magnitude vector is [out]
                made["magnitude"] = made["magnitude"].flatten()
            tensors |= {base + role_endings[role]: tensor for role, tensor in made.items()}
            if alpha is not None:
                tensors[base + role_endings.get("alpha", ".alpha")] = torch.tensor(alpha)
        else:
            made = loha_tensors(module, rank, four_d) if kind == "loha" else lokr_tensors(module, rank)
            if dora is not None:
                made["dora_scale"] = lora_tensors(module, 1, dora)["magnitude"]
            tensors |= {f"{base}.{role}": tensor for role, tensor in made.items()}
            if alpha is not None:
                tensors[f"{base}.alpha"] = torch.tensor(alpha)
    if scaling is None:
        scaling = 1.0 if alpha is None or not rank else alpha / rank
    return Written(tensors, header or {}, layers, {kind}, scaling, dora is not None)


def with_differences(models: dict, written: Written, components: tuple[str, ...], names: Names) -> Written:
    """ComfyUI's LoraSave default: besides the LoRA, full differences for 1-D norm weights (.diff) and for every
    bias (.diff_b)."""
    for component in components:
        for name, module in models[component].named_modules():
            if not isinstance(module, TARGET_LAYERS):
                continue
            base = names(component, name)
            if isinstance(module, nn.GroupNorm | nn.LayerNorm):
                written.tensors[f"{base}.diff"] = small(*module.weight.shape)
                written.layers[component] += 1
            if getattr(module, "bias", None) is not None:
                written.tensors[f"{base}.diff_b"] = small(*module.bias.shape)
                written.layers[component] += 1
    written.kinds.add("diff")
    return written


def writers(models: dict) -> dict[str, Callable[[], Written]]:
    """Every writer's file, by name, made on demand (each is a few megabytes)."""
    unet_text = {"unet": TRANSFORMER, "text_encoder": TEXT_LAYERS, "text_encoder_2": TEXT_LAYERS}
    attention_text = {"unet": ATTENTION, "text_encoder": TEXT_LAYERS[:4], "text_encoder_2": TEXT_LAYERS[:4]}

    def kohya_sgm(component: str, name: str) -> str:
        return FLAT[component] + flat(path_of(component, name, models, sgm=True))

    def kohya_diffusers(component: str, name: str) -> str:
        return FLAT[component] + flat(path_of(component, name, models, sgm=False))

    def dotted(prefixes: dict[str, str], sgm: bool) -> Names:
        return lambda component, name: prefixes[component] + path_of(component, name, models, sgm)

    def processor(component: str, name: str) -> str:
        attention, _, projection = name.rpartition(".to_")
        return f"{attention}.processor.to_{projection.removesuffix('.0')}_lora"

    def diffusers_style(component: str) -> str:
        return "diffusers-unet" if component == "unet" else "diffusers-text"

    adapter = {"unet.r": 2, "unet.lora_alpha": 8.0, "text_encoder.r": 2, "text_encoder.lora_alpha": 8.0,
               "text_encoder_2.r": 2, "text_encoder_2.lora_alpha": 8.0}  # fmt: skip
    kohya_header = {"ss_network_module": "networks.lora", "ss_network_dim": "2", "ss_network_alpha": "1.0"}

    def lcm() -> Written:
        """The LCM distillation script: attention keys renamed to old diffusers names, everything else peft's."""
        attention = write(models, {"unet": ATTENTION}, dotted(DIFFUSERS, False), style=lambda c: "diffusers-unet")
        rest = write(models, {"unet": KOHYA_CONV[len(ATTENTION) :]}, dotted(DIFFUSERS, False), style=lambda c: "peft")
        return Written(attention.tensors | rest.tensors, {}, {"unet": attention.layers["unet"] + rest.layers["unet"]},
                       {"lora"}, 1.0)  # fmt: skip

    def comfy_save(components: tuple[str, ...]) -> Written:
        text = (*TEXT_LAYERS, "embedding")
        endings = {"unet": FULL, "text_encoder": text, "text_encoder_2": (*text, *TEXT_PROJECTION)}
        names = dotted(COMFY, True)
        chosen = {component: endings[component] for component in components}
        return with_differences(models, write(models, chosen, names, rank=2), components, names)

    def lycoris(component: str, name: str) -> str:
        return "lycoris_" + flat(name)

    def peft_saved(component: str, name: str) -> str:
        return f"base_model.model.{name}"

    def processor_0_19(component: str, name: str) -> str:
        return "unet." + processor(component, name)

    def transformers_5(component: str, name: str) -> str:
        return FLAT[component] + flat(name.removeprefix("text_model."))

    def peft(component: str) -> str:
        return "peft"

    def processor_style(component: str) -> str:
        return "processor"

    conv = {"unet": KOHYA_CONV}
    full = {"unet": FULL}
    legacy_text = {**unet_text, "text_encoder_2": TEXT_LAYERS + TEXT_PROJECTION}
    text_only = {"text_encoder": TEXT_LAYERS, "text_encoder_2": TEXT_LAYERS}
    metadata = {"lora_adapter_metadata": json.dumps(adapter)}
    made = {
        "kohya": partial(write, models, unet_text, kohya_sgm, alpha=1.0, header=kohya_header),
        "kohya-conv_dim": partial(write, models, {**unet_text, **conv}, kohya_sgm, alpha=1.0),
        "lycoris-loha": partial(write, models, {**unet_text, **conv}, kohya_sgm, "loha", alpha=2.0),
        "lycoris-lokr": partial(write, models, conv, kohya_sgm, "lokr", rank=2, alpha=2.0),
        "lycoris-locon-dora-output": partial(write, models, conv, kohya_sgm, alpha=1.0, dora="output"),
        "lycoris-locon-dora-input": partial(write, models, conv, kohya_sgm, alpha=1.0, dora="input"),
        "simpletuner-lokr": partial(
            write, models, {"unet": TRANSFORMER}, lycoris, "lokr", rank=None, alpha=10000.0, scaling=1.0
        ),
        "diffusers-dreambooth": partial(write, models, attention_text, dotted(DIFFUSERS, False), style=diffusers_style),
        "diffusers-dreambooth-dora": partial(
            write, models, attention_text, dotted(DIFFUSERS, False), style=diffusers_style, dora="output"
        ),
        "diffusers-lcm": lcm,
        "diffusers-save_lora_weights": partial(
            write, models, attention_text, dotted(DIFFUSERS, False), style=peft, header=metadata, scaling=4.0
        ),
        "peft-save_pretrained": partial(write, models, {"unet": ATTENTION}, peft_saved, style=peft),
        "cog-sdxl": partial(write, models, {"unet": ATTENTION}, processor, style=processor_style),
        "diffusers-0.19-processors": partial(write, models, {"unet": ATTENTION}, processor_0_19, style=processor_style),
        "onetrainer-legacy": partial(write, models, legacy_text, kohya_diffusers, alpha=1.0),
        "onetrainer-legacy-loha": partial(write, models, conv, kohya_diffusers, "loha", alpha=2.0, four_d=True),
        "onetrainer-legacy-dora": partial(write, models, unet_text, kohya_diffusers, alpha=1.0, dora="input"),
        "onetrainer-full": partial(write, models, full, kohya_diffusers, alpha=2.0),
        "onetrainer-kohya": partial(write, models, full, kohya_sgm, alpha=2.0),
        "onetrainer-comfyui": partial(write, models, unet_text, dotted(COMFY, True), style=peft, alpha=1.0),
        "onetrainer-omi": partial(write, models, {"unet": TRANSFORMER}, dotted(DIFFUSERS, True), style=peft, alpha=1.0),
        "ai-toolkit": partial(write, models, {**unet_text, **full}, kohya_diffusers, alpha=2.0),
        "ai-toolkit-2024-sgm": partial(write, models, {"unet": TRANSFORMER}, kohya_sgm, alpha=2.0),
        "comfyui-lorasave": partial(comfy_save, ("unet",)),
        "comfyui-lorasave-text-encoders": partial(comfy_save, ("unet", "text_encoder", "text_encoder_2")),
        "transformers-5-text-names": partial(write, models, text_only, transformers_5, alpha=1.0),
    }
    return made
