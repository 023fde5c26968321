"""Random-initialised SDXL weights in the layout of the weights folder that download-weights writes.

Tests and benchmarks need a folder that loads exactly like the real SDXL 1.0 download, with no network and no
hub: a diffusers pipeline folder, and a random LoRA shaped like Flash-SDXL's (peft keys on every attention
projection) that loading fuses into the UNet. ``--size tiny`` keeps SDXL's structure and code paths (two text
encoders, text_time conditioning, 4 latent channels, a VAE with scale factor 8) at a size where a 1024x1024 4-step
edit takes seconds on a CPU. ``--size full`` has the real SDXL architecture (for GPU timings and memory) with random
fp16 weights and a rank-64 LoRA of Flash-SDXL's size. ``--device cuda`` fills the weights on the GPU (the copying that
takes most of the build on a CPU) and writes the same bytes as the CPU: the values are drawn on the CPU either way.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers.utils import logging as transformers_logging

from ...accelerators import ACCELERATORS, DEFAULT_ACCELERATOR
from ...errors import FolderError, ProjectError
from ...weights.build import lora_record, make_readable
from ...weights.manifest import replace_folder, write_manifest
from ...weights.sources import DEFAULT_SOURCES, DEPTH_FOLDER, SEGMENTATION_FOLDER
from .configs import (
    BOS_TOKEN,
    CLIP_MEAN,
    CLIP_STD,
    DEPTH,
    EOS_TOKEN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NEVER_FLAGGED,
    SAFETY_VISION,
    SEGMENTATION,
    TOKENIZER_2_PAD,
    TOKENIZER_PAD,
    build_tokenizer,
    check_tokenizers,
    component_configs,
    text_encoder_config,
    tiny_vocab,
    write_tokenizer_folder,
)

INIT_STD = 0.02
POOL_SIZE = 16_777_213  # a prime just below 2**24
FLASH_TARGETS = re.compile(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
"""The layers Flash-SDXL adapts: every attention projection of the UNet (560 in SDXL)."""
FLASH_RANK = {"tiny": 4, "full": 64}


def random_pool(seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """N(0, 0.02) values that weights are cut from, drawn on the CPU and moved to the device that fills the weights.

    Drawing every one of the full model's 3.5 billion values costs ~25 s on two cores (the
    generator is single-threaded); copying slices of a pool costs ~4 s. The pool's length
    is prime, so tensors wider than it do not repeat with their rows' period.
    """
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(POOL_SIZE, generator=generator) * INIT_STD).to(dtype).to(device)


def fill_from_pool(tensor: torch.Tensor, pool: torch.Tensor, generator: torch.Generator) -> None:
    """Copy the pool into a tensor, starting at a random offset and wrapping around."""
    flat = tensor.view(-1)
    start = int(torch.randint(len(pool), (1,), generator=generator))
    filled = 0
    while filled < len(flat):
        count = min(len(flat) - filled, len(pool) - start)
        flat[filled : filled + count] = pool[start : start + count]
        filled += count
        start = 0


def fill_random(model: nn.Module, pool: torch.Tensor, generator: torch.Generator) -> None:
    """Give a model built on the meta device real random weights, in the pool's dtype and on its device.

    Much cheaper than each module's own init (about a minute for the full UNet on two
    cores): N(0, 0.02) weights, zero biases, and norms at identity so activations stay
    finite. Parameters are visited in a fixed order, so one seed gives identical tensors.
    """
    state: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        is_norm = "Norm" in type(module).__name__
        for name, param in module.named_parameters(recurse=False):
            tensor = torch.empty(param.shape, dtype=pool.dtype, device=pool.device)
            if name == "bias":
                tensor.zero_()
            elif is_norm:
                tensor.fill_(1.0)
            else:
                fill_from_pool(tensor, pool, generator)
            state[f"{module_name}.{name}" if module_name else name] = tensor
    model.load_state_dict(state, strict=True, assign=True)


def build_random(factory: Callable[[Any], nn.Module], config: Any, pool: torch.Tensor, seed: int) -> Any:
    """Construct a component without initialising it, then fill it with random weights.

    Each component draws its offsets into the pool from its own generator, so changing one
    component's size does not change the others' weights. Buffers are built normally
    (include_buffers=False): some, like CLIP's position ids, are not saved and must hold
    real values.
    """
    with init_empty_weights(include_buffers=False):
        model = factory(config)
    fill_random(model, pool, torch.Generator().manual_seed(seed))
    return model.eval()


def build_pipeline(size: str, seed: int, device: torch.device) -> StableDiffusionXLImg2ImgPipeline:
    """Assemble an SDXL img2img pipeline with random weights, filled on the device, and an LCM scheduler."""
    tokenizer, tokenizer_2 = build_tokenizer(TOKENIZER_PAD), build_tokenizer(TOKENIZER_2_PAD)
    vocab_size = len(tokenizer) if size == "tiny" else 49408
    configs = component_configs(size, vocab_size)
    dtype = torch.float32 if size == "tiny" else torch.float16
    scheduler = LCMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="trailing",
        set_alpha_to_one=False,
        steps_offset=1,
        clip_sample=False,
    )
    pool = random_pool(seed * 5, dtype, device)
    return StableDiffusionXLImg2ImgPipeline(
        vae=build_random(lambda c: AutoencoderKL(**c), configs.vae, pool, seed * 5 + 1),
        text_encoder=build_random(CLIPTextModel, CLIPTextConfig(**configs.text_encoder), pool, seed * 5 + 2),
        text_encoder_2=build_random(
            CLIPTextModelWithProjection, CLIPTextConfig(**configs.text_encoder_2), pool, seed * 5 + 3
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=build_random(lambda c: UNet2DConditionModel(**c), configs.unet, pool, seed * 5 + 4),
        scheduler=scheduler,
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True,
    )


def check_layout(folder: Path) -> None:
    """Fail unless the folder holds only safetensors weights and the expected model index."""
    pickles = [p for p in folder.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    if pickles:
        raise RuntimeError(f"pickle files written: {pickles}")
    index = json.loads((folder / "model_index.json").read_text())
    expected = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline",
        "requires_aesthetics_score": False,
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "LCMScheduler"],
    }
    wrong = {key: index.get(key) for key, value in expected.items() if index.get(key) != value}
    if wrong:
        raise RuntimeError(f"unexpected model_index.json entries: {wrong}")
    for weights in (
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ):
        if not (folder / weights).is_file():
            raise RuntimeError(f"missing {weights}")


def folder_bytes(folder: Path) -> int:
    """Total size of the files under a folder."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def check_replaceable(target: Path) -> None:
    """Refuse to replace anything but a missing or empty folder or an earlier pipeline folder.

    A mistyped DIR (``.``, the repository) must not be deleted.
    """
    if not (target.exists() or target.is_symlink()):
        return
    if target.is_dir() and (not any(target.iterdir()) or (target / "model_index.json").is_file()):
        return
    raise FolderError(f"{target} exists and is not a pipeline folder; not replacing it")


LORA_LAYOUTS = {"flash": "peft", "lightning": "kohya", "tcd": "peft"}
"""The key style each accelerator's test LoRA is written in: Flash-SDXL's and TCD's files are diffusers/peft
files; SDXL-Lightning's is written kohya-style here (its real file's keys were not checked from this machine; the
loader reads both)."""


def write_flash_like_lora(unet: nn.Module, path: Path, rank: int, seed: int, layout: str = "peft") -> int:
    """A random LoRA on Flash-SDXL's layers, in peft's key style or kohya's (with alphas equal to the rank); rank 64
    gives 93M float32 parameters at full size (the real Flash file: 92.9M, 372 MB). Returns the number of layers."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in unet.named_modules():
        if isinstance(layer, nn.Linear) and FLASH_TARGETS.search(name):
            layer_rank = min(rank, layer.in_features, layer.out_features)
            down = torch.randn(layer_rank, layer.in_features, generator=generator) / layer.in_features**0.5
            up = torch.randn(layer.out_features, layer_rank, generator=generator) * INIT_STD
            if layout == "kohya":
                prefix = "lora_unet_" + name.replace(".", "_")
                tensors |= {f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up,
                            f"{prefix}.alpha": torch.tensor(float(layer_rank))}  # fmt: skip
            else:
                tensors[f"unet.{name}.lora_A.weight"] = down
                tensors[f"unet.{name}.lora_B.weight"] = up
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, {"format": "pt"})
    return len([key for key in tensors if "lora_A" in key or "lora_down" in key])


def write_safety_checker(out: Path, size: str, seed: int, device: torch.device) -> None:
    """A random StableDiffusionSafetyChecker and its preprocessor config, in the layout download-weights writes."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    vision = SAFETY_VISION[size]
    config = CLIPConfig(
        text_config=text_encoder_config(size, len(tiny_vocab()), big=False),
        vision_config=vision,
        projection_dim=16 if size == "tiny" else 768,
    )
    checker = build_random(StableDiffusionSafetyChecker, config, random_pool(seed, torch.float32, device), seed + 1)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(NEVER_FLAGGED)
        checker.special_care_embeds_weights.fill_(NEVER_FLAGGED)
    checker.save_pretrained(out / "safety_checker", safe_serialization=True)
    preprocessing = {  # the format of CompVis's own file: sizes as plain numbers
        "crop_size": vision["image_size"], "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
        "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD, "resample": 3, "size": vision["image_size"],
    }  # fmt: skip
    (out / "feature_extractor").mkdir(parents=True, exist_ok=True)
    (out / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(preprocessing, indent=2) + "\n")


def write_map_models(out: Path, size: str, seed: int, device: torch.device) -> None:
    """Random CLIPSeg and Depth Anything models, their tokenizer and preprocessor configs, in the layout
    download-weights writes (their published files as they are)."""
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
    )

    segmentation, depth = SEGMENTATION[size], DEPTH[size]
    vocab = tiny_vocab()
    folder = out / SEGMENTATION_FOLDER
    write_tokenizer_folder(folder, TOKENIZER_PAD)
    text = {
        **segmentation["text"],
        "vocab_size": len(vocab) if size == "tiny" else 49408,
        "max_position_embeddings": 77,
        **{f"{kind}_token_id": vocab[token] for kind, token in (("bos", BOS_TOKEN), ("eos", EOS_TOKEN),
                                                               ("pad", TOKENIZER_PAD))},
    }  # fmt: skip
    config = CLIPSegConfig(
        text_config=text,
        vision_config=segmentation["vision"],
        use_complex_transposed_convolution=True,
        **segmentation["model"],
    )
    model = build_random(CLIPSegForImageSegmentation, config, random_pool(seed, torch.float32, device), seed + 1)
    model.save_pretrained(folder, safe_serialization=True)
    side = segmentation["input_size"]
    write_preprocessing(folder, {
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD, "image_processor_type": "ViTImageProcessor", "processor_class": "CLIPSegProcessor",
        "resample": 2, "rescale_factor": 1 / 255, "size": {"height": side, "width": side},
    })  # fmt: skip
    layers = depth["backbone"]["num_hidden_layers"]
    backbone = Dinov2Config(
        **depth["backbone"],
        patch_size=14,
        reshape_hidden_states=False,
        out_indices=[layers * quarter // 4 for quarter in (1, 2, 3, 4)],  # as V2 Small: layers 3, 6, 9 and 12
    )
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=backbone.hidden_size, patch_size=14, **depth["model"]
    )
    pool = random_pool(seed + 2, torch.float32, device)
    model = build_random(DepthAnythingForDepthEstimation, config, pool, seed + 3)
    model.save_pretrained(out / DEPTH_FOLDER, safe_serialization=True)
    side = depth["input_size"]
    write_preprocessing(out / DEPTH_FOLDER, {
        "do_normalize": True, "do_pad": False, "do_rescale": True, "do_resize": True, "ensure_multiple_of": 14,
        "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "image_processor_type": "DPTImageProcessor",
        "keep_aspect_ratio": True, "resample": 3, "rescale_factor": 1 / 255, "size": {"height": side, "width": side},
    })  # fmt: skip


def write_preprocessing(folder: Path, preprocessing: dict) -> None:
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessing, indent=2) + "\n")


CPU = torch.device("cpu")


def write_test_weights(
    target: Path, size: str = "tiny", seed: int = 0, device: torch.device = CPU, accelerator: str = DEFAULT_ACCELERATOR
) -> int:
    """Build the pipeline into a temporary sibling folder, check it, then move it into place.

    Returns the total bytes written. An interrupted run leaves only a ``.tmp-`` folder, never
    a complete-looking target.
    """
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    try:
        pipeline = build_pipeline(size, seed, device)
        out = staging / target.name
        pipeline.save_pretrained(out, safe_serialization=True, max_shard_size="20GB")
        lora = lora_record(DEFAULT_SOURCES.with_accelerator(accelerator))
        write_flash_like_lora(
            pipeline.unet, out / lora["file"], FLASH_RANK[size], seed * 5 + 5, LORA_LAYOUTS[accelerator]
        )
        del pipeline
        write_safety_checker(out, size, seed * 5 + 6, device)
        write_map_models(out, size, seed * 5 + 7, device)
        write_tokenizer_folder(out / "tokenizer", TOKENIZER_PAD)
        write_tokenizer_folder(out / "tokenizer_2", TOKENIZER_2_PAD)
        make_readable(out)
        check_layout(out)
        check_tokenizers(out)
        write_manifest(out, sources={"make-test-weights": {"size": size, "seed": seed}}, lora=lora)
        total = folder_bytes(out)
        replace_folder(out, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return total


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="make-test-weights",
        description=(
            "Write random-initialised SDXL weights as a diffusers StableDiffusionXLImg2ImgPipeline folder "
            "(LCMScheduler, safetensors only), loadable offline with from_pretrained(DIR)."
        ),
        epilog=(
            "tiny: SDXL's structure at toy size (fp32, ~7 MB) for CPU tests; "
            "full: the real SDXL 1.0 architecture (fp16, ~7 GB) for GPU benchmarks without a download. "
            "The same --seed gives identical tensors. An existing DIR is replaced atomically, "
            "if it is empty or a pipeline folder (has model_index.json)."
        ),
    )
    parser.add_argument(
        "dir", metavar="DIR", type=Path, help="output folder (created, or replaced if it holds weights)"
    )
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny", help="model size (default: tiny)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights (default: 0)")
    parser.add_argument("--accelerator", choices=tuple(ACCELERATORS), default=DEFAULT_ACCELERATOR,
                        help="whose LoRA layout and step rule the folder carries (default: flash)")  # fmt: skip
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the weights are filled (default: cpu); cuda writes the same bytes, faster",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.seed < 2**32:
        parser.error("--seed must be in [0, 2**32)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    return args


def main(argv: list[str]) -> int:
    """Write the weights and print one summary line."""
    args = parse_args(argv)
    started = time.perf_counter()
    # Turn SIGTERM into an exception so a killed run still removes its staging folder.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    try:
        total = write_test_weights(
            Path(os.path.abspath(args.dir)), args.size, args.seed, torch.device(args.device), args.accelerator
        )
    except ProjectError as error:
        print(f"make-test-weights: {error}", file=sys.stderr)
        return error.exit_code
    print(f"{args.dir}: {args.size} weights, {total} bytes, {time.perf_counter() - started:.1f} s")
    return 0
