"""The edit: SDXL components from diffusers around the differential-diffusion sampler."""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

from . import sampler
from .accelerators import ACCELERATORS, DEFAULT_ACCELERATOR, Accelerator
from .errors import NumericError
from .loras.merge import LoraMerger
from .loras.tokens import TokenEmbeddings
from .maps import shaping
from .maps.estimators import DepthEstimator, TextSegmenter
from .pictures.colour import UNTAGGED, ColourSpace
from .pictures.metadata import OutputMetadata
from .safety import SafetyChecker
from .sizing import WORKING_AREA, aspect_distortion, working_size

log = logging.getLogger(__name__)

NON_FINITE = (
    "the edit produced NaN or infinite values, so no picture is returned (a LoRA at a high scale, or a value beyond"
    " the GPU's 16-bit range); try a lower lora_scale, another seed, or no LoRA"
)

MAX_ASPECT_DISTORTION = 0.1
"""Grid rounding changes the aspect by a few percent; beyond this the working picture is visibly stretched."""


StepListener = Callable[[int, int], None]
"""(steps done, steps to run) after each UNet call of an edit."""


@dataclass(frozen=True)
class EditRequest:
    """One edit. change_map is (H, W) in [0, 1] at the image's size, strength and inversion applied."""

    image: np.ndarray
    change_map: np.ndarray
    prompt: str
    negative_prompt: str = ""
    steps: int = 4
    guidance_scale: float = 0.0
    num_outputs: int = 1
    seed: int = 0
    working_area: int = WORKING_AREA
    colour_space: ColourSpace = UNTAGGED
    """The image's space: the model sees sRGB, and generated pixels are brought back into it before compositing."""


@dataclass
class EditResult:
    """Edited pictures, RGB uint8 (H, W, 3) at the input's size, with seconds spent per stage."""

    images: list[np.ndarray]
    timings: dict[str, float] = field(default_factory=dict)
    metadata: OutputMetadata | None = None
    """What the outputs embed from the input (colour profile, EXIF)."""
    crop_images: list[np.ndarray] | None = None
    """The edited crops themselves, when the edit was made on a crop of the picture (models/cropping.py)."""
    generated: bool = True
    """False when the map changed nothing and the outputs are the input itself."""
    change_map: torch.Tensor | None = None
    """The map the edit used, (H, W) at the outputs' size (return_map)."""


class Stopwatch:
    """Times stages; synchronises the device only at stage ends, never inside the denoising loop."""

    def __init__(self, device: torch.device):
        self.device = device
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self._last
        self._last = now


def resize_pixels(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bicubic resize of 0-255 pixels (N, C, H, W); none at all when the size already matches."""
    if pixels.shape[-2:] == (height, width):
        return pixels
    return F.interpolate(pixels, size=(height, width), mode="bicubic", antialias=True).clamp(0.0, 255.0)


class DifferentialDiffusionPipeline:
    """SDXL differential diffusion with a few-step LCM-style sampler and an exact-keep composite."""

    def __init__(
        self,
        sdxl: StableDiffusionXLImg2ImgPipeline,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.sdxl = sdxl
        self.unet: UNet2DConditionModel = sdxl.unet
        self.vae: AutoencoderKL = sdxl.vae
        self.scheduler: LCMScheduler = sdxl.scheduler
        self.device = device
        self.dtype = dtype
        self.offload_hooks: list = []
        """accelerate's model-offload hooks in the low-memory mode (models/acceleration.py: save_memory)."""
        self.safety: SafetyChecker | None = None
        self.accelerator: Accelerator = ACCELERATORS[DEFAULT_ACCELERATOR]
        """The few-step LoRA fused at load, whose step rule the sampler runs."""
        self.segmenter: TextSegmenter | None = None
        """map_prompt's CLIPSeg."""
        self.depth: DepthEstimator | None = None
        """map_depth's Depth Anything."""
        """Set by loading when the weights folder has one; the editor checks what is returned with it."""
        self.setup_timings: dict[str, float] = {}
        """Seconds of each stage of loading (models/weights/load.py), for setup measurements."""
        self.loras = LoraMerger(
            {"unet": sdxl.unet, "text_encoder": sdxl.text_encoder, "text_encoder_2": sdxl.text_encoder_2}
        )
        self.tokens = TokenEmbeddings(sdxl)
        """The new tokens of the LoRAs in use; their words in a prompt are replaced by the tokens."""
        self.latent_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def offload(self) -> None:
        """In the low-memory mode, move every model back to the CPU after a request (the last one used stays on the
        GPU otherwise); nothing to do in the normal mode."""
        for hook in self.offload_hooks:
            hook.offload()

    @torch.inference_mode()
    def edit(
        self, request: EditRequest, time_each_step: bool = False, on_step: StepListener | None = None
    ) -> EditResult:
        """Edit one picture. time_each_step synchronises after every UNet call: for benchmarks only. on_step is told
        (steps done, steps to run) after each UNet call, for progress bars; it must not touch the tensors."""
        height, width = request.change_map.shape
        watch = Stopwatch(self.device)
        max_strength = float(request.change_map.max(initial=0.0))
        schedule = sampler.Schedule.from_scheduler(self.scheduler, request.steps, **self.accelerator.step_rule)
        start = sampler.first_active_step(max_strength, schedule)
        if start is None:
            log.info("map is all black: returning the input unchanged")
            return EditResult(
                [request.image.copy() for _ in range(request.num_outputs)], watch.timings, generated=False
            )

        work_width, work_height = working_size(width, height, request.working_area)
        if aspect_distortion((width, height), (work_width, work_height)) > MAX_ASPECT_DISTORTION:
            log.warning(
                "image: extreme aspect ratio; generating at %dx%d and resizing back to %dx%d",
                work_width,
                work_height,
                width,
                height,
            )
        log.info(
            "editing %dx%d at %dx%d, %d of %d steps active, %d output(s)",
            width,
            height,
            work_width,
            work_height,
            len(schedule) - start,
            len(schedule),
            request.num_outputs,
        )
        image = torch.tensor(request.image, device=self.device).permute(2, 0, 1)[None].float()
        change_map = torch.tensor(request.change_map, device=self.device)
        work_image = self._to_srgb(resize_pixels(image, work_height, work_width), request.colour_space)
        work_map = shaping.resize_map(change_map, work_height, work_width)
        latent_map = shaping.resize_map(work_map, work_height // self.latent_scale, work_width // self.latent_scale)
        weights = sampler.blend_weights(latent_map, schedule)
        watch.lap("prepare")

        original = self._encode_image(work_image)
        watch.lap("vae_encode")
        progress = None if on_step is None else lambda step: on_step(step + 1 - start, len(schedule) - start)
        predict_noise = self._noise_predictor(
            request, work_width, work_height, schedule, watch if time_each_step else None, progress
        )
        watch.lap("text_encode")

        noises = self._draw_noises(request, original.shape[1:], len(schedule))
        latents = sampler.sample(predict_noise, original, noises, schedule, weights, start)
        watch.lap("denoise")

        generated = self._decode_latents(latents)
        watch.lap("vae_decode")

        images = self._composite(image, self._from_srgb(generated, request.colour_space), work_map)
        watch.lap("composite")
        return EditResult(images, watch.timings)

    @staticmethod
    def _to_srgb(pixels: torch.Tensor, space: ColourSpace) -> torch.Tensor:
        """0-255 pixels (1, 3, H, W) at the working size, converted to sRGB unless they are sRGB already."""
        if space.is_srgb:
            return pixels
        converted = space.to_srgb(pixels[0].round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())
        return torch.tensor(converted, device=pixels.device).permute(2, 0, 1)[None].float()

    @staticmethod
    def _from_srgb(pixels: torch.Tensor, space: ColourSpace) -> torch.Tensor:
        """Generated 0-255 sRGB pixels (N, 3, H, W) at the working size, brought into the image's space."""
        if space.is_srgb:
            return pixels
        batch = pixels.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        converted = np.stack([space.from_srgb(picture) for picture in batch])
        return torch.tensor(converted, device=pixels.device).permute(0, 3, 1, 2).float()

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE-encode 0-255 pixels to scaled latents (fp32), using the posterior's mean: no sampling noise."""
        scaled = (pixels / 127.5 - 1.0).clamp(-1.0, 1.0).to(self.dtype)
        posterior = self.vae.encode(scaled).latent_dist
        return posterior.mode().float() * self.vae.config.scaling_factor

    def _decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode in the model dtype (no fp32 upcast) to 0-255 float pixels; a non-finite value anywhere (a LoRA
        at a high scale, an overflow in 16-bit arithmetic) fails the edit here, before it can reach a picture."""
        decoded = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.dtype)).sample.float()
        if not bool(torch.isfinite(decoded).all()):  # the edit's one host sync besides reading the pictures back
            raise NumericError(NON_FINITE)
        return ((decoded + 1.0) * 127.5).clamp(0.0, 255.0)

    def _noise_predictor(
        self,
        request: EditRequest,
        work_width: int,
        work_height: int,
        schedule: sampler.Schedule,
        step_watch: Stopwatch | None,
        progress: Callable[[int], None] | None = None,
    ) -> sampler.NoisePredictor:
        """Encode the prompt once and return the UNet call (with guidance only when scale > 1)."""
        guided = request.guidance_scale > 1.0
        prompt_embeds, negative_embeds, pooled, negative_pooled = self.sdxl.encode_prompt(
            prompt=self.tokens.rewrite(request.prompt),
            device=self.device,
            num_images_per_prompt=request.num_outputs,
            do_classifier_free_guidance=guided,
            negative_prompt=self.tokens.rewrite(request.negative_prompt) or None,
        )
        time_ids = torch.tensor(
            [[work_height, work_width, 0, 0, work_height, work_width]], device=self.device, dtype=self.dtype
        ).repeat(request.num_outputs, 1)
        if guided:
            prompt_embeds = torch.cat([negative_embeds, prompt_embeds])
            pooled = torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        conditioning = {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids}
        prompt_embeds = prompt_embeds.to(self.dtype)
        timesteps = torch.tensor(schedule.timesteps, device=self.device)

        def predict_noise(latents: torch.Tensor, step: int) -> torch.Tensor:
            log.info("denoising step %d/%d (t=%d)", step + 1, len(schedule), schedule.timesteps[step])
            model_input = latents.to(self.dtype)
            if guided:
                model_input = torch.cat([model_input, model_input])
            noise_pred = self.unet(
                model_input,
                timesteps[step],
                encoder_hidden_states=prompt_embeds,
                added_cond_kwargs=conditioning,
                return_dict=False,
            )[0].float()
            if guided:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = sampler.guide(uncond, cond, request.guidance_scale)
            if step_watch is not None:
                step_watch.lap(f"unet_step_{step + 1}")
            if progress is not None:
                progress(step)
            return noise_pred

        return predict_noise

    def _draw_noises(self, request: EditRequest, latent_shape: torch.Size, steps: int) -> torch.Tensor:
        """All the request's noise at once, from a CPU generator so a seed means the same on any device."""
        generator = torch.Generator("cpu").manual_seed(request.seed)
        shape = (request.num_outputs, *latent_shape)
        noises = [torch.randn(shape, generator=generator) for _ in range(steps)]
        return torch.stack(noises).to(self.device)

    def _composite(self, image: torch.Tensor, generated: torch.Tensor, work_map: torch.Tensor) -> list[np.ndarray]:
        """Bring results back to the input's size and paste them over the original through a feathered mask."""
        height, width = image.shape[-2:]
        generated = resize_pixels(generated, height, width)
        alpha = shaping.resize_map(shaping.composite_alpha(work_map), height, width)
        # Kept pixels are the input's by selection: no arithmetic on them, so nothing computed can reach them.
        blended = torch.where(alpha > 0, torch.lerp(image, generated, alpha), image).round().to(torch.uint8)
        return [picture.permute(1, 2, 0).cpu().numpy() for picture in blended]
