"""User LoRAs: applying, switching, repeating and removing them, the memory their weight copies cost, and merging
against running each update beside its layer (the alternative models/loras/merge.py rejects).

The LoRAs are random, kohya-style, on what SDXL LoRAs trained with kohya's scripts usually adapt: every attention
projection, feed-forward and proj_in/proj_out layer of the UNet and the q/k/v/out and MLP layers of both text
encoders (attention_only: the UNet's attention projections, as Flash-SDXL's).
"""

import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ...loras.formats import flat
from ...weights.load import load_pipeline, select_device
from ..measuring import synchronised_seconds
from .table import Table

ATTENTION_LAYERS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_LAYERS = (*ATTENTION_LAYERS, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def adapted_layers(models: dict, attention_only: bool) -> dict[tuple[str, str], torch.nn.Linear]:
    layers = {}
    for component, model in models.items():
        if attention_only and component != "unet":
            continue
        endings = (ATTENTION_LAYERS if attention_only else UNET_LAYERS) if component == "unet" else TEXT_LAYERS
        for name, module in model.named_modules():
            if (
                isinstance(module, torch.nn.Linear)
                and name.endswith(endings)
                and not name.endswith(("to_qkv", "to_kv"))
            ):
                layers[component, name] = module
    return layers


def write_random_lora(layers: dict, path: Path, rank: int, seed: int) -> int:
    """A kohya-style file (lora_down/lora_up/alpha) on the layers; returns its parameter count."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for (component, name), layer in layers.items():
        key = PREFIXES[component] + flat(
            name if component == "unet" else f"text_model.{name.removeprefix('text_model.')}"
        )
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, layer.in_features, generator=generator).half() * 0.01
        tensors[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, rank, generator=generator).half() * 0.01
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, path)
    return sum(tensor.numel() for tensor in tensors.values())


def unet_call(pipeline, side: int):
    """One UNet call at the working size side x side, batch 1, on fixed random inputs."""
    unet, config = pipeline.unet, pipeline.sdxl.unet.config
    generator = torch.Generator().manual_seed(0)
    latents = side // pipeline.latent_scale
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    device, dtype = pipeline.device, pipeline.dtype
    inputs = {
        "sample": torch.randn(1, 4, latents, latents, generator=generator).to(device, dtype),
        "timestep": torch.tensor(759, device=device),
        "encoder_hidden_states": torch.randn(1, 77, config.cross_attention_dim, generator=generator).to(device, dtype),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(1, text_dim, generator=generator).to(device, dtype),
            "time_ids": torch.tensor([[side, side, 0, 0, side, side]], device=device, dtype=dtype),
        },
    }

    def call():
        with torch.inference_mode():
            unet(**inputs, return_dict=False)

    return call


def beside_hooks(pipeline, path: Path) -> list:
    """The LoRA run beside its layers: y = W x + scale * up(down(x)) by forward hooks, weights untouched."""
    handles = []
    for update in pipeline.loras.read(path):
        if update.component != "unet":
            continue
        module = pipeline.loras.targets.modules[update.component, update.module]
        down = update.tensors["down"].to(pipeline.device, pipeline.dtype)
        up = (update.tensors["up"] * update.scaling).to(pipeline.device, pipeline.dtype)
        handles.append(module.register_forward_hook(
            lambda module, args, output, down=down, up=up: output + F.linear(F.linear(args[0], down), up)
        ))  # fmt: skip
    return handles


def measure_loras(
    weights: Path, size: int = 256, rank: int = 32, repeats: int = 3, attention_only: bool = False
) -> Table:
    device, dtype = select_device()
    pipeline = load_pipeline(weights, device, dtype)
    models = {"unet": pipeline.sdxl.unet, "text_encoder": pipeline.sdxl.text_encoder,
              "text_encoder_2": pipeline.sdxl.text_encoder_2}  # fmt: skip
    layers = adapted_layers(models, attention_only)
    table = Table(f"{weights} on {device} ({str(dtype).removeprefix('torch.')})")
    merger = pipeline.loras
    with tempfile.TemporaryDirectory() as scratch:
        first, second = Path(scratch) / "a.safetensors", Path(scratch) / "b.safetensors"
        parameters = write_random_lora(layers, first, rank, 0)
        write_random_lora(layers, second, rank, 1)
        touched = sum(layer.weight.numel() for layer in layers.values())
        described = f"rank {rank}, {len(layers)} layers, {parameters / 1e6:.1f}M parameters"
        table.add("LoRA", f"{described}, {touched / 1e6:.0f}M weights touched", parameters=parameters)
        read_s = synchronised_seconds(lambda: merger.read(first))
        table.add("read a file", f"{read_s:.3f} s", read_s=read_s)
        updates = {path: merger.read(path) for path in (first, second)}
        apply_s = synchronised_seconds(lambda: merger.apply(("a",), [(updates[first], 1.0)]))
        table.add("apply (none to A)", f"{apply_s:.3f} s", apply_s=apply_s)
        table.add("copies of the changed weights", f"{merger.copied_bytes() / 2**20:.0f} MiB",
                  copies_bytes=merger.copied_bytes())  # fmt: skip
        switch_s = synchronised_seconds(lambda: merger.apply(("b",), [(updates[second], 1.0)]))
        table.add("switch (A to B)", f"{switch_s:.3f} s", switch_s=switch_s)
        both_s = synchronised_seconds(lambda: merger.apply(("ab",), [(updates[first], 1.0), (updates[second], 0.5)]))
        table.add("two at once (A + B)", f"{both_s:.3f} s", both_s=both_s)
        restore_s = synchronised_seconds(merger.restore)
        table.add("remove (restore the reference)", f"{restore_s:.3f} s", restore_s=restore_s)

        call = unet_call(pipeline, size)
        call()  # warm-up
        plain, merged, beside = [], [], []
        for _ in range(repeats):  # interleaved, so that the machine's drift hits all three alike
            plain.append(synchronised_seconds(call))
            merger.apply(("a",), [(updates[first], 1.0)])
            merged.append(synchronised_seconds(call))
            merger.restore()
            handles = beside_hooks(pipeline, first)
            beside.append(synchronised_seconds(call))
            for handle in handles:
                handle.remove()
    table.add(f"UNet call at {size} px, no LoRA", f"{statistics.median(plain):.3f} s (median of {repeats})",
              plain_s=plain)  # fmt: skip
    table.add(f"UNet call at {size} px, LoRA merged", f"{statistics.median(merged):.3f} s", merged_s=merged)
    table.add(f"UNet call at {size} px, LoRA beside the layers", f"{statistics.median(beside):.3f} s", beside_s=beside)
    ratios = [b / m for b, m in zip(beside, merged, strict=True)]
    table.add("beside / merged, pair by pair", ", ".join(f"{ratio:.2f}x" for ratio in ratios))
    return table


def add_arguments(parser) -> None:
    parser.add_argument("--size", type=int, default=256, help="working size of the UNet calls (default 256)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--attention-only", action="store_true", help="LoRAs on the UNet's attention projections only (Flash-SDXL's)"
    )


def run(args) -> Table:
    return measure_loras(args.weights, args.size, args.rank, args.repeats, args.attention_only)
