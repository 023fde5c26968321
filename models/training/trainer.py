"""Training a LoRA on SDXL's base weights: the loop, its objective and its records.

The choices, and why:
- SDXL base without the accelerator LoRA: a LoRA trained on base SDXL is what stacks on Flash, Lightning or TCD at
  serving (they are all LoRAs of base SDXL too).
- Epsilon prediction on the standard schedule (1,000 DDPM steps, SDXL's scaled-linear betas), timesteps drawn
  uniformly, and Min-SNR weighting (Hang et al. 2023, gamma 5): each sample's loss is scaled by min(SNR, 5) / SNR,
  which damps the nearly-clean timesteps whose small, conflicting gradients slow training; diffusers' and kohya's
  SDXL scripts offer the same.
- The LoRA on every attention projection of the UNet (and of both text encoders when asked: lora.adapted_layers), the
  token's two new embeddings whenever a prompt says it (pivotal tuning, as Replicate's SDXL trainer does), at
  TOKEN_LEARNING_RATE.
- On a GPU: frozen weights in bf16, bf16 autocast, the trained parameters in fp32, gradient checkpointing of the
  UNet, and bitsandbytes' 8-bit AdamW when it is installed (the image leaves it out: README); on the CPU, fp32 and
  torch's AdamW. Gradients clipped to norm 1.
- Latents are encoded once (the VAE's mean), and each step's noise and timesteps are drawn on the CPU from the seed, so
  one seed and one set of inputs make the same LoRA bytes on the same CPU (tested). On a GPU nothing forces
  deterministic kernels (attention's and convolutions' backward passes may sum in any order), so bytes may differ.
- With mask_prompt, each photo's loss is weighted by CLIPSeg's probability that a pixel shows the subject, floored at
  MASK_FLOOR and scaled to a mean of 1, so backgrounds count a tenth as much (a photo where nothing is found trains
  evenly, not at all).
- The loss on a fixed draw (the first EVALUATION_PICTURES photos, fixed noise and timesteps spread over the schedule)
  is measured before and after: the training loss itself is too noisy, from its random timesteps, to show progress.
"""

import io
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from diffusers.training_utils import compute_snr
from PIL import Image

from ..errors import NumericError
from ..loras.tokens import TokenEmbeddings
from ..maps.estimators import TextSegmenter, resized_probabilities
from .inputs import TrainingOptions
from .lora import LoraLinear, add_adapters
from .photos import Example, prompt_of
from .tokens import add_trainable_tokens

log = logging.getLogger(__name__)

SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
"""What the training's noise schedule takes from the model's scheduler config (which is the few-step sampler's)."""
MIN_SNR_GAMMA = 5.0
TOKEN_LEARNING_RATE = 3e-4
"""The new tokens' learning rate: Replicate's SDXL trainer's default for them."""
WEIGHT_DECAY = 1e-4
MAX_GRAD_NORM = 1.0
MASK_FLOOR = 0.1
EVALUATION_PICTURES = 8
LOG_LINES = 20
"""About this many progress lines in a training's log, whatever its length."""
SAMPLE_STEPS = 25
SAMPLE_GUIDANCE = 5.0
"""Base SDXL's usual sampling: Euler, 25 steps, classifier-free guidance 5."""


@dataclass
class Progress:
    """What a training has done so far, for the log and the record."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    """Each logged interval's mean loss."""
    samples: dict[str, bytes] = field(default_factory=dict)
    """Sample pictures (WebP) by their name in the .tar."""
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Trained:
    """The outcome: the adapters by component, the token's rows (None when no prompt said it), and the records."""

    adapters: dict[str, dict[str, LoraLinear]]
    token_rows: list[torch.Tensor] | None
    progress: Progress
    evaluation: dict[str, float]
    subject_shares: list[float] | None
    optimizer: str


def batches(sizes: list[tuple[int, int]], batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of photos of one bucket each: per epoch the photos are shuffled, grouped by bucket, cut into
    batches (a bucket's last may be smaller), and the batches shuffled."""
    while True:
        groups: dict[tuple[int, int], list[int]] = {}
        for index in torch.randperm(len(sizes), generator=generator).tolist():
            groups.setdefault(sizes[index], []).append(index)
        chunks = [group[start : start + batch_size] for group in groups.values()
                  for start in range(0, len(group), batch_size)]  # fmt: skip
        for order in torch.randperm(len(chunks), generator=generator).tolist():
            yield chunks[order]


def subject_weights(probabilities: torch.Tensor) -> torch.Tensor:
    """Loss weights from the subject's probabilities (h, w): floored at MASK_FLOOR, scaled to a mean of 1."""
    weights = MASK_FLOOR + (1 - MASK_FLOOR) * probabilities.clamp(0, 1)
    return weights / weights.mean()


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    snr = compute_snr(scheduler, timesteps)
    return snr.clamp(max=MIN_SNR_GAMMA) / snr


def make_optimizer(groups: list[dict], device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """bitsandbytes' 8-bit AdamW on CUDA (its optimizer states take a quarter of the memory), torch's AdamW else."""
    if device.type == "cuda":
        try:
            import bitsandbytes
        except ImportError:
            log.warning("bitsandbytes is not installed: using torch's AdamW")
        else:
            return bitsandbytes.optim.AdamW8bit(groups), "AdamW8bit (bitsandbytes)"
    return torch.optim.AdamW(groups), "AdamW (torch)"


def duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


class Training:
    """One training's models, data and loop."""

    def __init__(self, components: dict, options: TrainingOptions, examples: list[Example], device: torch.device,
                 dtype: torch.dtype) -> None:  # fmt: skip
        self.options, self.examples, self.device, self.dtype = options, examples, device, dtype
        self.sdxl = StableDiffusionXLPipeline(**components)
        self.sdxl.set_progress_bar_config(disable=True)
        schedule = self.sdxl.scheduler.config
        self.scheduler = DDPMScheduler.from_config({key: schedule[key] for key in SCHEDULE_KEYS})
        if self.scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"the base model predicts {self.scheduler.config.prediction_type}, not epsilon")
        self.generator = torch.Generator("cpu").manual_seed(options.seed)
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")
        self.latents: list[torch.Tensor] = []
        self.loss_weights: list[torch.Tensor | None] = [None] * len(examples)
        self.subject_shares: list[float] | None = None
        self.token_trained = False
        self.embeddings: TokenEmbeddings | None = None
        self.token_parameters: list[torch.nn.Parameter] = []
        self.adapters: dict[str, dict[str, LoraLinear]] = {}

    def prompt(self, text: str) -> str:
        return self.embeddings.rewrite(text) if self.token_trained else text

    def encode_latents(self) -> None:
        """Each photo's latents, once: the VAE's mean (not a draw), scaled as the UNet expects."""
        vae = self.sdxl.vae
        with torch.no_grad(), self.autocast:
            for example in self.examples:
                pixels = torch.tensor(example.pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
                mean = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mean
                self.latents.append(mean.float() * vae.config.scaling_factor)

    def weigh_by_subject(self, segmenter: TextSegmenter) -> None:
        """mask_prompt's weights for each photo's loss, at its latents' size; the share of each photo it found."""
        self.subject_shares = []
        for index, example in enumerate(self.examples):
            probabilities = segmenter.probabilities(example.pixels, [self.options.mask_prompt])
            height, width = self.latents[index].shape[-2:]
            resized = resized_probabilities(probabilities, height, width)[0]
            self.subject_shares.append(float(resized.mean()))
            self.loss_weights[index] = subject_weights(resized).to(self.device)
        log.info("mask_prompt %r covers %s of the photos", self.options.mask_prompt,
                 ", ".join(f"{share:.0%}" for share in self.subject_shares))  # fmt: skip

    def prepare_parameters(self) -> list[dict]:
        """Add the token and the adapters; the optimizer's parameter groups."""
        options = self.options
        prompts = [example.prompt for example in self.examples]
        self.token_trained = any(options.token in prompt for prompt in prompts)
        groups = []
        if self.token_trained:
            self.embeddings, rows = add_trainable_tokens(self.sdxl, options.token, self.generator)
            self.token_parameters = rows
            groups.append({"params": rows, "lr": TOKEN_LEARNING_RATE, "weight_decay": 0.0})
        else:
            log.warning("token %r is in no caption nor the caption prefix: no new tokens are trained", options.token)
        alpha = float(options.lora_rank)
        components = ("unet", "text_encoder", "text_encoder_2") if options.train_text_encoder else ("unet",)
        self.adapters = {component: add_adapters(component, getattr(self.sdxl, component), options.lora_rank, alpha,
                                                 self.generator) for component in components}  # fmt: skip
        lora = [parameter for layers in self.adapters.values() for adapter in layers.values()
                for parameter in (adapter.down, adapter.up)]  # fmt: skip
        groups.append({"params": lora, "lr": options.learning_rate, "weight_decay": WEIGHT_DECAY})
        count = sum(parameter.numel() for group in groups for parameter in group["params"])
        log.info("training %d LoRA layers (rank %d) and %s: %s parameters",
                 sum(len(layers) for layers in self.adapters.values()), options.lora_rank,
                 "the token's 2 new tokens" if self.token_trained else "no tokens", f"{count:,}")  # fmt: skip
        if self.device.type == "cuda":
            self.sdxl.unet.enable_gradient_checkpointing()
        return groups

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's text conditioning (both encoders' penultimate states, the second one's pooled output), with
        gradients when the token or the text encoders train."""
        texts = [self.prompt(prompt) for prompt in prompts]
        trained = self.token_trained or self.options.train_text_encoder
        with torch.set_grad_enabled(torch.is_grad_enabled() and trained):
            embeds, _, pooled, _ = self.sdxl.encode_prompt(
                prompt=texts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return embeds, pooled

    def losses(self, indices: list[int], noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Each photo's loss: the weighted squared error of the predicted noise, times its Min-SNR weight."""
        latents = torch.cat([self.latents[index] for index in indices])
        noise, timesteps = noise.to(self.device), timesteps.to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        time_ids = torch.tensor([[*self.examples[index].original_size, *self.examples[index].crop_top_left,
                                  *self.examples[index].size] for index in indices], dtype=torch.float32,
                                device=self.device)  # fmt: skip
        with self.autocast:
            embeds, pooled = self.encode_prompts([self.examples[index].prompt for index in indices])
            predicted = self.sdxl.unet(
                noisy, timesteps, encoder_hidden_states=embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            ).sample  # fmt: skip
        error = F.mse_loss(predicted.float(), noise, reduction="none")
        weights = [self.loss_weights[index] for index in indices]
        if weights[0] is not None:
            error = error * torch.stack(weights)[:, None]
        return error.mean(dim=(1, 2, 3)) * min_snr_weights(self.scheduler, timesteps)

    def fixed_draw(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """The evaluation draw: for each of the first photos, noise from its own seed and a timestep spread over the
        schedule, the same before and after training."""
        count = min(EVALUATION_PICTURES, len(self.examples))
        generator = torch.Generator("cpu").manual_seed(self.options.seed + 1)
        total = self.scheduler.config.num_train_timesteps
        return [(index, torch.randn(self.latents[index].shape, generator=generator),
                 torch.tensor([int((index + 0.5) * total / count)])) for index in range(count)]  # fmt: skip

    @torch.no_grad()
    def evaluate(self, draw: list[tuple[int, torch.Tensor, torch.Tensor]]) -> float:
        values = [float(self.losses([index], noise, timestep)[0]) for index, noise, timestep in draw]
        return sum(values) / len(values)

    @torch.no_grad()
    def sample(self, step: int, progress: Progress) -> float:
        """A picture of the validation prompt by base SDXL with the LoRA as it is now, from the same seed each time."""
        started = time.perf_counter()
        prompt = self.prompt(
            self.options.validation_prompt or prompt_of(None, self.options.caption_prefix, self.options.token)
        )
        size = self.options.resolution
        with self.autocast:
            picture = self.sdxl(
                prompt=prompt, height=size, width=size, num_inference_steps=SAMPLE_STEPS,
                guidance_scale=SAMPLE_GUIDANCE, generator=torch.Generator("cpu").manual_seed(self.options.seed),
                output_type="np",
            ).images[0]  # fmt: skip
        if not np.isfinite(picture).all():
            log.warning("the sample at step %d is not finite (the training diverged?); it is left out", step)
            return time.perf_counter() - started
        name = f"samples/step-{step:05d}.webp"
        buffer = io.BytesIO()
        Image.fromarray(np.round(picture * 255).astype(np.uint8)).save(buffer, "WEBP", quality=90)
        progress.samples[name] = buffer.getvalue()
        seconds = time.perf_counter() - started
        progress.seconds["samples"] = progress.seconds.get("samples", 0.0) + seconds
        log.info("sample at step %d: %s (%.1fs)", step, name, seconds)
        return seconds

    def run(self, on_step: Callable[[int, int], None] | None = None) -> Trained:
        options = self.options
        groups = self.prepare_parameters()
        optimizer, optimizer_name = make_optimizer(groups, self.device)
        parameters = [parameter for group in groups for parameter in group["params"]]
        draw = self.fixed_draw()
        evaluation = {"start": self.evaluate(draw)}
        progress = Progress()
        every = max(1, options.steps // LOG_LINES)
        order = batches([example.size for example in self.examples], options.batch_size, self.generator)
        interval, interval_started, started = [], time.perf_counter(), time.perf_counter()
        for step in range(1, options.steps + 1):
            indices = next(order)
            latent_shape = (len(indices), *self.latents[indices[0]].shape[1:])
            noise = torch.randn(latent_shape, generator=self.generator)
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(indices),),
                                      generator=self.generator)  # fmt: skip
            loss = self.losses(indices, noise, timesteps).mean()
            value = loss.item()  # the step's one wait for the device: the log and the check below both need it
            if not math.isfinite(value):
                raise NumericError(f"learning_rate: the loss became {value} at step {step}; try a lower learning_rate")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            interval.append(value)
            progress.step = step
            if on_step is not None:
                on_step(step, options.steps)
            if step % every == 0 or step == options.steps:
                now = time.perf_counter()
                rate = len(interval) / max(now - interval_started, 1e-9)
                progress.losses.append(sum(interval) / len(interval))
                log.info("step %d/%d  loss %.4f  %.2f it/s  %s left", step, options.steps, progress.losses[-1], rate,
                         duration((options.steps - step) / rate))  # fmt: skip
                interval, interval_started = [], now
            if options.sample_every and step % options.sample_every == 0 and step != options.steps:
                interval_started += self.sample(step, progress)  # the rate counts training steps alone
        progress.seconds["train"] = time.perf_counter() - started - progress.seconds.get("samples", 0.0)
        evaluation["end"] = self.evaluate(draw)
        log.info("loss on the fixed draw: %.4f before, %.4f after (%+.1f%%)", evaluation["start"], evaluation["end"],
                 100 * (evaluation["end"] / evaluation["start"] - 1))  # fmt: skip
        self.sample(options.steps, progress)
        rows = [parameter.detach() for parameter in self.token_parameters] if self.token_trained else None
        return Trained(self.adapters, rows, progress, evaluation, self.subject_shares, optimizer_name)
