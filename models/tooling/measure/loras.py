"""User LoRAs: applying, switching, repeating and removing them, the memory their weight copies cost, and merging
against running each update beside its layer (the alternative models/loras/merge.py rejects).

The LoRAs are random, kohya-style, on one of three sets of layers:

- kohya (the default): what SDXL LoRAs trained with kohya's scripts usually adapt, every attention projection,
  feed-forward and proj_in/proj_out layer of the UNet and the q/k/v/out and MLP layers of both text encoders;
- attention: the UNet's attention projections, as Flash-SDXL's;
- every: every layer a file can change, as ComfyUI's LoraSave extraction writes it (a LoRA on every linear,
  convolution and embedding layer, full differences of every norm weight and bias). Merging beside the layers has
  no form for full differences, so only applying, switching and removing are measured.
"""

import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ... import memory
from ...loras.names import flat
from ...weights.load import load_pipeline, select_device
from ..measuring import PeakMemory, synchronised_seconds
from .table import Table

ATTENTION_LAYERS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_LAYERS = (*ATTENTION_LAYERS, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
LAYER_SETS = ("kohya", "attention", "every")
LOW_RANK_LAYERS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)
MERGE_MARGIN_BYTES = 2 * 2**30
"""Memory a merge needs beyond its copies, and this process beyond its models: float32 working copies of the largest
weights, the files' tensors."""


def adapted_layers(models: dict, layers: str) -> dict[tuple[str, str], torch.nn.Module]:
    """The layers a LoRA of the set adapts, by (component, name)."""
    adapted = {}
    for component, model in models.items():
        if layers == "attention" and component != "unet":
            continue
        endings = (ATTENTION_LAYERS if layers == "attention" else UNET_LAYERS) if component == "unet" else TEXT_LAYERS
        for name, module in model.named_modules():
            if name.endswith(("to_qkv", "to_kv")):  # the fast path's fused projections: views of the separate ones
                continue
            if (layers == "every" and isinstance(module, LOW_RANK_LAYERS)) or (
                isinstance(module, torch.nn.Linear) and name.endswith(endings)
            ):
                adapted[component, name] = module
    return adapted


def file_name(component: str, name: str) -> str:
    return PREFIXES[component] + flat(name if component == "unet" else f"text_model.{name.removeprefix('text_model.')}")


def write_random_lora(models: dict, layers: str, path: Path, rank: int, seed: int) -> int:
    """A kohya-style file (lora_down/lora_up/alpha) on the set's layers, and for "every" full differences (.diff,
    .diff_b) of every norm weight and bias; returns its parameter count."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}

    def small(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.01).half()

    for (component, name), layer in adapted_layers(models, layers).items():
        key = file_name(component, name)
        weight = layer.weight
        tensors[f"{key}.lora_down.weight"] = small(rank, *weight.shape[1:])
        tensors[f"{key}.lora_up.weight"] = small(weight.shape[0], rank, *[1] * (weight.dim() - 2))
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    if layers == "every":
        for component, model in models.items():
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.GroupNorm | torch.nn.LayerNorm) and module.weight is not None:
                    tensors[f"{file_name(component, name)}.diff"] = small(*module.weight.shape)
                if isinstance(module, (*LOW_RANK_LAYERS, torch.nn.GroupNorm, torch.nn.LayerNorm)) and isinstance(
                    getattr(module, "bias", None), torch.Tensor
                ):
                    tensors[f"{file_name(component, name)}.diff_b"] = small(*module.bias.shape)
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
    for update in pipeline.loras.read(path).updates:
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
    weights: Path, size: int = 256, rank: int = 32, repeats: int = 3, layers: str = "kohya", dtype: str | None = None
) -> Table:
    """dtype: the models' dtype, by name; None for the one serving picks (float32 on a CPU, bf16 or fp16 on a GPU)."""
    device, serving_dtype = select_device()
    dtype = getattr(torch, dtype) if dtype else serving_dtype
    pipeline = load_pipeline(weights, device, dtype)
    models = {"unet": pipeline.sdxl.unet, "text_encoder": pipeline.sdxl.text_encoder,
              "text_encoder_2": pipeline.sdxl.text_encoder_2}  # fmt: skip
    table = Table(f"{weights} on {device} ({str(dtype).removeprefix('torch.')})")
    with tempfile.TemporaryDirectory() as scratch:
        first, second = Path(scratch) / "a.safetensors", Path(scratch) / "b.safetensors"
        parameters = write_random_lora(models, layers, first, rank, 0)
        write_random_lora(models, layers, second, rank, 1)
        updates = measure_merging(pipeline, first, second, parameters, f"{layers} layers, rank {rank}", table)
        if updates and layers != "every":
            measure_calls(pipeline, updates, first, size, repeats, table)
    return table


def measure_merging(pipeline, first: Path, second: Path, parameters: int, lora: str, table: Table) -> list | None:
    """Reading, applying, switching, stacking and removing the two files, and the memory the merge holds and uses;
    None when the copies would not fit this machine's memory (the row says so, and nothing is merged)."""
    merger = pipeline.loras
    read_s = synchronised_seconds(lambda: merger.read(first))
    updates = {path: merger.read(path).updates for path in (first, second)}
    touched = sum(merger.targets.parameter(u.component, u.module, u.parameter).numel() for u in updates[first])
    described = f"{lora}: {len(updates[first])} parameters changed, {parameters / 1e6:.1f}M values in the file"
    table.add("LoRA", f"{described}, {touched / 1e6:.0f}M weights touched", parameters=parameters, touched=touched)
    table.add("read a file", f"{read_s:.3f} s", read_s=read_s)
    needed = merger.copy_bytes([(updates[first], 1.0)])
    free = memory.available_bytes() if pipeline.device.type == "cpu" else None
    if free is not None and needed + MERGE_MARGIN_BYTES > free:
        table.add("apply", f"not run: the copies need {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB is free",
                  copies_bytes=needed, free_bytes=free)  # fmt: skip
        return None
    peak = PeakMemory(pipeline.device)
    peak.reset()
    apply_s = synchronised_seconds(lambda: merger.apply(("a",), [(updates[first], 1.0)]))
    copies = merger.copied_bytes()
    table.add("apply (none to A)", f"{apply_s:.3f} s", apply_s=apply_s)
    table.add("copies of the changed weights", f"{copies / 2**20:.0f} MiB ({copies / touched:.1f} bytes a weight)",
              copies_bytes=copies)  # fmt: skip
    table.add("peak memory of the apply, copies included", f"{peak.peak_bytes() / 2**20:.0f} MiB",
              apply_peak_bytes=peak.peak_bytes())  # fmt: skip
    switch_s = synchronised_seconds(lambda: merger.apply(("b",), [(updates[second], 1.0)]))
    table.add("switch (A to B)", f"{switch_s:.3f} s", switch_s=switch_s)
    both_s = synchronised_seconds(lambda: merger.apply(("ab",), [(updates[first], 1.0), (updates[second], 0.5)]))
    table.add("two at once (A + B)", f"{both_s:.3f} s", both_s=both_s)
    restore_s = synchronised_seconds(merger.restore)
    table.add("remove (restore the reference)", f"{restore_s:.3f} s", restore_s=restore_s)
    return updates[first]


def measure_calls(pipeline, updates: list, path: Path, size: int, repeats: int, table: Table) -> None:
    """UNet calls with no LoRA, the LoRA merged, and the LoRA beside the layers, interleaved so that the machine's
    drift hits all three alike."""
    merger = pipeline.loras
    call = unet_call(pipeline, size)
    call()  # warm-up
    plain, merged, beside = [], [], []
    for _ in range(repeats):
        plain.append(synchronised_seconds(call))
        merger.apply(("a",), [(updates, 1.0)])
        merged.append(synchronised_seconds(call))
        merger.restore()
        handles = beside_hooks(pipeline, path)
        beside.append(synchronised_seconds(call))
        for handle in handles:
            handle.remove()
    table.add(f"UNet call at {size} px, no LoRA", f"{statistics.median(plain):.3f} s (median of {repeats})",
              plain_s=plain)  # fmt: skip
    table.add(f"UNet call at {size} px, LoRA merged", f"{statistics.median(merged):.3f} s", merged_s=merged)
    table.add(f"UNet call at {size} px, LoRA beside the layers", f"{statistics.median(beside):.3f} s", beside_s=beside)
    ratios = [b / m for b, m in zip(beside, merged, strict=True)]
    table.add("beside / merged, pair by pair", ", ".join(f"{ratio:.2f}x" for ratio in ratios))


def add_arguments(parser) -> None:
    parser.add_argument("--size", type=int, default=256, help="working size of the UNet calls (default 256)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--layers", choices=LAYER_SETS, default="kohya",
        help="kohya: attention, feed-forward and projections, both text encoders (default); attention: the UNet's"
        " attention projections (Flash-SDXL's); every: every layer and bias a file can change (ComfyUI's extraction)",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="the models' dtype (default:"
                        " serving's, float32 on a CPU)")  # fmt: skip


def run(args) -> Table:
    return measure_loras(args.weights, args.size, args.rank, args.repeats, args.layers, args.dtype)
