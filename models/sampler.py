"""The differential-diffusion rule on a consistency (LCM) sampler, as pure tensor functions.

Each pixel has a strength s in [0, 1]. A strength-s pixel behaves like img2img that enters the
schedule at timestep s * T: at step i (timestep t_i, next t_{i+1}, t_N = 0) the model's denoised
estimate is blended with the clean original latent by

    w_i(s) = clamp((s * T - t_{i+1}) / (t_i - t_{i+1}), 0, 1)

before it is re-noised to t_{i+1}. The weight is continuous in s (no quantisation to the number of
steps), exactly 0 for s = 0 (the original latent passes through untouched) and exactly 1 at every
step for s = 1 (plain full-strength img2img).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    """The few-step schedule: timesteps, their cumulative alphas and LCM boundary scalings."""

    timesteps: tuple[int, ...]
    alpha_bars: tuple[float, ...]
    c_skip: tuple[float, ...]
    c_out: tuple[float, ...]
    num_train_timesteps: int

    @classmethod
    def from_scheduler(cls, scheduler, steps: int) -> "Schedule":
        """The schedule at Flash-SDXL's timesteps, with the noise schedule and LCM boundary scalings of a diffusers
        LCMScheduler (whose own timesteps, and step state, are not used)."""
        timesteps = flash_timesteps(steps, int(scheduler.config.num_train_timesteps))
        scalings = [scheduler.get_scalings_for_boundary_condition_discrete(t) for t in timesteps]
        return cls(
            timesteps=timesteps,
            alpha_bars=tuple(float(scheduler.alphas_cumprod[t]) for t in timesteps),
            c_skip=tuple(float(c_skip) for c_skip, _ in scalings),
            c_out=tuple(float(c_out) for _, c_out in scalings),
            num_train_timesteps=int(scheduler.config.num_train_timesteps),
        )

    def __len__(self) -> int:
        return len(self.timesteps)


def flash_timesteps(steps: int, train_timesteps: int = 1000) -> tuple[int, ...]:
    """Evenly spaced from the last training timestep: 999, 749, 499, 249 at 4 steps, the timesteps Flash-SDXL is
    distilled at (its training mixture centres on them; 1 and 2 steps take 999 and 999, 499 from the same grid).

    diffusers' LCMScheduler gives 999, 759, 499, 259 instead: it rounds to LCM's 50-step distillation grid, which
    Flash-SDXL was not trained on. Other step counts follow the same even spacing, outside the trained timesteps.
    """
    return tuple(train_timesteps - 1 - (step * train_timesteps) // steps for step in range(steps))


def blend_weights(strength: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Weights w_i(s) of the model's estimate at every step, shape (steps, *strength.shape)."""
    entry = strength * schedule.num_train_timesteps
    bounds = (*schedule.timesteps, 0)
    weights = [((entry - bounds[i + 1]) / (bounds[i] - bounds[i + 1])).clamp(0.0, 1.0) for i in range(len(schedule))]
    return torch.stack(weights)


def first_active_step(max_strength: float, schedule: Schedule) -> int | None:
    """First step whose weight is non-zero somewhere; earlier steps return the original and can be skipped."""
    entry = max_strength * schedule.num_train_timesteps
    bounds = (*schedule.timesteps[1:], 0)
    return next((i for i, next_t in enumerate(bounds) if entry > next_t), None)


def add_noise(clean: torch.Tensor, noise: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0) at a timestep with cumulative alpha alpha_bar."""
    return alpha_bar**0.5 * clean + (1.0 - alpha_bar) ** 0.5 * noise


def consistency_denoise(
    noise_pred: torch.Tensor, sample: torch.Tensor, alpha_bar: float, c_skip: float, c_out: float
) -> torch.Tensor:
    """LCM's denoised estimate: c_out * x0_pred + c_skip * x_t, for an epsilon-predicting model."""
    predicted_original = (sample - (1.0 - alpha_bar) ** 0.5 * noise_pred) / alpha_bar**0.5
    return c_out * predicted_original + c_skip * sample


def guide(noise_uncond: torch.Tensor, noise_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance."""
    return noise_uncond + scale * (noise_cond - noise_uncond)


NoisePredictor = Callable[[torch.Tensor, int], torch.Tensor]
"""(noisy latents, step index) -> predicted noise."""


def sample(
    predict_noise: NoisePredictor,
    original: torch.Tensor,
    noises: Sequence[torch.Tensor],
    schedule: Schedule,
    weights: torch.Tensor,
    start: int = 0,
) -> torch.Tensor:
    """Run the schedule from step `start`, blending each denoised estimate with the original latent.

    noises[i] is the noise that brings a clean latent to timestep i, drawn once per request (in the
    order diffusers draws them), so skipping inactive steps changes nothing. torch.lerp is exact at
    both ends: weight 0 returns the original latent bit for bit, weight 1 the model's estimate.
    """
    latents = add_noise(original, noises[start], schedule.alpha_bars[start])
    for i in range(start, len(schedule)):
        noise_pred = predict_noise(latents, i)
        denoised = consistency_denoise(
            noise_pred, latents, schedule.alpha_bars[i], schedule.c_skip[i], schedule.c_out[i]
        )
        denoised = torch.lerp(original, denoised, weights[i])
        if i + 1 == len(schedule):
            return denoised
        latents = add_noise(denoised, noises[i + 1], schedule.alpha_bars[i + 1])
    raise ValueError(f"start step {start} is outside a {len(schedule)}-step schedule")
