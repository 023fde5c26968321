"""The baseline: plain diffusers img2img with its defaults, the weights folder's LoRA loaded unfused through peft, at
Flash's timesteps; built around our own tensors when the dtypes agree, so that both fit in memory at once."""

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...pictures.write import encode_image
from ...sampler import flash_timesteps
from ...weights.manifest import read_manifest
from ..measuring import ModuleTimer

PROMPT = "a dramatic sunset sky with pink clouds"
SEED = 1234
QUALITY = 90


def baseline_lora(weights: Path, given: Path | None = None, none: bool = False) -> Path | None:
    """The LoRA the baseline loads unfused: the one given, else the weights folder's own (Flash-SDXL, or the random
    one of its shape that make-test-weights writes); none at all with none=True."""
    if none:
        return None
    if given is not None:
        return given
    lora = read_manifest(weights).lora
    return None if lora is None else weights / lora["file"]


def load_diffusers(weights: Path, device: torch.device, lora: Path | None, ours=None):
    """Plain diffusers with its defaults: fp16 on GPU (fp32 on CPU), the LoRA loaded the usual way (peft, unfused).

    Given our pipeline in the same dtype, the baseline is built around our tensors instead of a second copy of the
    same values: stock diffusers modules (unfused, default attention and layout) whose parameters are ours, the LoRA
    layers wrapped around them as usual. Both full-size fp32 pipelines then fit in memory at once and can run
    interleaved; as ours carry the LoRA fused already, the baseline's pictures then differ from ours, its cost not.
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if ours is not None and ours.dtype == dtype:
        shared = {
            "unet": plain_copy_sharing_weights(ours.unet),
            "vae": plain_copy_sharing_weights(ours.vae),
            "text_encoder": ours.sdxl.text_encoder,
            "text_encoder_2": ours.sdxl.text_encoder_2,
        }
        sdxl = StableDiffusionXLImg2ImgPipeline.from_pretrained(weights, dtype=dtype, **shared)
    else:
        sdxl = StableDiffusionXLImg2ImgPipeline.from_pretrained(weights, dtype=dtype).to(device)
    if lora is not None:
        sdxl.load_lora_weights(lora.parent, weight_name=lora.name)
    sdxl.set_progress_bar_config(disable=True)
    return sdxl


def default_layout(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor with PyTorch's default row-major strides: itself when it has them, else a copy.

    Not is_contiguous(): a 1x1 convolution's weight made channels_last passes it, yet its strides still steer the
    convolution to channels_last kernels.
    """
    if tensor.stride() == torch.empty(tensor.shape, device="meta").stride():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def plain_copy_sharing_weights(model: torch.nn.Module) -> torch.nn.Module:
    """The stock diffusers model of the same config, unfused, whose parameters are the given model's tensors.

    Tensors that our fast path made channels_last are copied back to the default layout, which stock diffusers has.
    """
    with torch.device("meta"):
        plain = type(model).from_config(model.config)
    state = {
        name: default_layout(tensor)
        for name, tensor in model.state_dict().items()
        if ".to_qkv." not in name and ".to_kv." not in name
    }
    plain.load_state_dict(state, strict=True, assign=True)
    return plain.eval().requires_grad_(False)


def diffusers_run(
    sdxl,
    image_path: Path,
    batch: int,
    steps: int,
    device: torch.device,
    output_format: str,
    profile: bool = False,
):
    """The same edit through StableDiffusionXLImg2ImgPipeline with its defaults (strength 1 = all-white map), at the
    timesteps ours uses (Flash's 999, 749, 499, 249 at 4 steps).

    profile times the text encoders, VAE encoder, each UNet call and the VAE decoder, through forward hooks.
    """
    stages = {
        "text_encode": [sdxl.text_encoder, sdxl.text_encoder_2],
        "vae_encode": [sdxl.vae.encoder],
        "unet_step": [sdxl.unet],
        "vae_decode": [sdxl.vae.decoder],
    }

    def run() -> dict[str, float]:
        timer = ModuleTimer(device, stages if profile else {})
        with timer:
            timings = generate()
        return {**timings, **timer.timings}

    def generate() -> dict[str, float]:
        started = time.perf_counter()
        picture = Image.open(image_path).convert("RGB")
        decoded = time.perf_counter()
        images = sdxl(
            prompt=PROMPT,
            image=picture,
            strength=1.0,
            timesteps=list(flash_timesteps(steps)),
            guidance_scale=0.0,
            num_images_per_prompt=batch,
            height=picture.height,
            width=picture.width,
            generator=torch.Generator("cpu").manual_seed(SEED),
        ).images
        if device.type == "cuda":
            torch.cuda.synchronize()
        generated = time.perf_counter()
        for image in images:
            encode_image(np.asarray(image), output_format, QUALITY)
        return {
            "decode_inputs": decoded - started,
            "pipeline": generated - decoded,
            "encode_outputs": time.perf_counter() - generated,
        }

    return run
