"""The differential-diffusion rule on a few-step sampler, as pure tensor functions.

Each pixel has a strength s in [0, 1]. A strength-s pixel behaves like img2img that enters the
schedule at timestep s * T: at step i (timestep t_i, next t_{i+1}, t_N = 0) the model's clean
estimate x0_i is blended with the clean original latent by

    w_i(s) = clamp((s * T - t_{i+1}) / (t_i - t_{i+1}), 0, 1),    b_i = lerp(original, x0_i, w_i(s))

before it is re-noised to t_{i+1}. The weight is continuous in s (no quantisation to the number of
steps), exactly 0 for s = 0 (the original latent passes through untouched) and exactly 1 at every
step for s = 1 (plain full-strength img2img). The last step returns b_{N-1}.

Each accelerator supplies its timesteps, its estimate and its re-noising (a_t is the cumulative alpha,
eps the model's noise prediction, x_t the current latents, z fresh noise drawn per step):

- Flash-SDXL (LCM, `fresh`): x0_i = c_out * (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) + c_skip * x_t with
  LCM's boundary scalings; x_{t+1} = sqrt(a_{t+1}) b_i + sqrt(1 - a_{t+1}) z.
- SDXL-Lightning (trailing Euler on an epsilon model, `implied`): x0_i = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t);
  the noise b_i implies, e_i = (x_t - sqrt(a_t) b_i) / sqrt(1 - a_t), carries on:
  x_{t+1} = sqrt(a_{t+1}) b_i + sqrt(1 - a_{t+1}) e_i (a deterministic DDIM step, which is Euler's step in sigma).
- TCD (`mixed`, gamma): x0_i and e_i as Lightning's; down to s = floor((1 - gamma) t_{i+1}) deterministically,
  x_s = sqrt(a_s) b_i + sqrt(1 - a_s) e_i, then forward to t_{i+1} with fresh noise:
  x_{t+1} = sqrt(a_{t+1} / a_s) x_s + sqrt(1 - a_{t+1} / a_s) z. gamma = 0 is Lightning's step, gamma = 1 nearly LCM's.

Where w = 0 the blend returns the original, so its implied noise is the noise its latents carry: a kept pixel's
trajectory stays the noised original under every rule, and its final value is the original bit for bit.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    """The few-step schedule: timesteps, their cumulative alphas, the estimate's boundary scalings and the
    re-noising rule (the module's docstring)."""

    timesteps: tuple[int, ...]
    alpha_bars: tuple[float, ...]
    c_skip: tuple[float, ...]
    c_out: tuple[float, ...]
    num_train_timesteps: int
    renoise: str = "fresh"
    """fresh (LCM), implied (Lightning's deterministic step) or mixed (TCD)."""
    alpha_bars_s: tuple[float, ...] = ()
    """mixed: the cumulative alpha at s = floor((1 - gamma) t_{i+1}) after each step but the last."""

    @classmethod
    def from_scheduler(
        cls,
        scheduler,
        steps: int,
        renoise: str = "fresh",
        lcm_scalings: bool = True,
        lcm_grid: bool = False,
        gamma: float = 0.0,
    ) -> "Schedule":
        """The schedule with the noise schedule (and LCM's boundary scalings) of a diffusers LCMScheduler, whose own
        timesteps and step state are not used: Flash-SDXL's timesteps (Euler's trailing spacing), or LCM's 50-step
        grid (TCD's) with lcm_grid; the plain estimate (c_skip 0, c_out 1) without lcm_scalings."""
        train = int(scheduler.config.num_train_timesteps)
        timesteps = lcm_grid_timesteps(steps, train) if lcm_grid else flash_timesteps(steps, train)
        scalings = [
            scheduler.get_scalings_for_boundary_condition_discrete(t) if lcm_scalings else (0.0, 1.0) for t in timesteps
        ]
        alpha = [float(value) for value in scheduler.alphas_cumprod]
        return cls(
            timesteps=timesteps,
            alpha_bars=tuple(alpha[t] for t in timesteps),
            c_skip=tuple(float(c_skip) for c_skip, _ in scalings),
            c_out=tuple(float(c_out) for _, c_out in scalings),
            num_train_timesteps=train,
            renoise=renoise,
            alpha_bars_s=tuple(alpha[tcd_timestep_s(gamma, t)] for t in timesteps[1:]) if renoise == "mixed" else (),
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


def lcm_grid_timesteps(steps: int, train_timesteps: int = 1000, original_steps: int = 50) -> tuple[int, ...]:
    """TCD's timesteps: `steps` of LCM's 50-step distillation grid (19, 39, ..., 999), evenly from its top, as
    diffusers' TCDScheduler picks them: 999, 759, 499, 259 at 4 steps."""
    grid = [(index + 1) * (train_timesteps // original_steps) - 1 for index in range(original_steps)][::-1]
    return tuple(grid[(index * original_steps) // steps] for index in range(steps))


def tcd_timestep_s(gamma: float, next_timestep: int) -> int:
    """floor((1 - gamma) * t), in float32 as diffusers' TCDScheduler computes it (0.7 * 500 is 350 there, 349.99...
    in double precision)."""
    return int(torch.floor((1.0 - gamma) * torch.tensor(next_timestep)))


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


def renoise(
    blended: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, schedule: Schedule, step: int
) -> torch.Tensor:
    """The latents at the next timestep from this step's blended estimate, by the schedule's rule."""
    alpha_next = schedule.alpha_bars[step + 1]
    if schedule.renoise == "fresh":
        return add_noise(blended, noise, alpha_next)
    alpha = schedule.alpha_bars[step]
    implied = (latents - alpha**0.5 * blended) / (1.0 - alpha) ** 0.5
    if schedule.renoise == "implied":
        return add_noise(blended, implied, alpha_next)
    alpha_s = schedule.alpha_bars_s[step]
    return add_noise(add_noise(blended, implied, alpha_s), noise, alpha_next / alpha_s)


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

    noises[i] is the noise that brings a clean latent to timestep i (the fresh noise of the step before it), drawn
    once per request (in the order diffusers draws them), so skipping inactive steps changes nothing. torch.lerp is
    exact at both ends: weight 0 returns the original latent bit for bit, weight 1 the model's estimate.
    """
    latents = add_noise(original, noises[0], schedule.alpha_bars[0])
    for i in range(start):  # the skipped steps' re-noising of the original, without the model: the same latents
        latents = renoise(original, latents, noises[i + 1], schedule, i)
    for i in range(start, len(schedule)):
        noise_pred = predict_noise(latents, i)
        denoised = consistency_denoise(
            noise_pred, latents, schedule.alpha_bars[i], schedule.c_skip[i], schedule.c_out[i]
        )
        denoised = torch.lerp(original, denoised, weights[i])
        if i + 1 == len(schedule):
            return denoised
        latents = renoise(denoised, latents, noises[i + 1], schedule, i)
    raise ValueError(f"start step {start} is outside a {len(schedule)}-step schedule")
