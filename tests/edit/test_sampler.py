"""The differential-diffusion rule: continuous, exact at 0, plain img2img at 1, faithful to LCM."""

import itertools

import pytest
import torch
from diffusers import EulerDiscreteScheduler, LCMScheduler, TCDScheduler

from models import sampler

SDXL_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def make_scheduler() -> LCMScheduler:
    return LCMScheduler(**SDXL_BETAS)


def schedule(steps: int = 4) -> sampler.Schedule:
    return sampler.Schedule.from_scheduler(make_scheduler(), steps)


def test_the_schedule_runs_at_flash_sdxl_s_timesteps():
    """Flash-SDXL is distilled at 999, 749, 499, 249; LCMScheduler's own 4 steps would be 999, 759, 499, 259."""
    assert schedule(4).timesteps == (999, 749, 499, 249)
    assert (schedule(1).timesteps, schedule(2).timesteps) == ((999,), (999, 499))
    assert schedule(8).timesteps == (999, 874, 749, 624, 499, 374, 249, 124)
    scheduler = make_scheduler()
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(749)
    assert schedule(4).alpha_bars[1] == float(scheduler.alphas_cumprod[749])
    assert (schedule(4).c_skip[1], schedule(4).c_out[1]) == (float(c_skip), float(c_out))


def test_black_gets_zero_weight_and_white_full_weight_at_every_step():
    weights = sampler.blend_weights(torch.tensor([0.0, 1.0]), schedule(4))
    assert torch.equal(weights[:, 0], torch.zeros(4))
    assert torch.equal(weights[:, 1], torch.ones(4))


def test_weights_are_continuous_not_quantised_to_steps():
    weights = sampler.blend_weights(torch.tensor([0.30, 0.35]), schedule(4))
    assert not torch.equal(weights[:, 0], weights[:, 1])


def test_weights_grow_with_strength_at_every_step():
    strengths = torch.linspace(0, 1, 101)
    weights = sampler.blend_weights(strengths, schedule(4))
    assert (weights.diff(dim=1) >= 0).all()
    assert (weights.sum(dim=0).diff() > 0).all(), "total weight must rise strictly with strength"


@pytest.mark.parametrize(
    ("max_strength", "expected"), [(0.0, None), (0.1, 3), (0.25, 2), (0.5, 1), (0.749, 1), (0.75, 0), (1.0, 0)]
)
def test_first_active_step_skips_steps_that_would_return_the_original(max_strength, expected):
    assert sampler.first_active_step(max_strength, schedule(4)) == expected


def test_one_step_model_still_honours_the_map():
    weights = sampler.blend_weights(torch.tensor([0.25, 0.5, 1.0]), schedule(1))
    assert weights[0].tolist() == pytest.approx([0.25 * 1000 / 999, 0.5 * 1000 / 999, 1.0])


def draw_noises(shape, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(shape, generator=generator) for _ in range(steps)])


def toy_noise_predictor(latents: torch.Tensor, step: int) -> torch.Tensor:
    return torch.tanh(latents * 0.7 + 0.1 * step)


def test_full_weight_equals_diffusers_lcm_img2img_with_the_same_seed():
    """Our step math, blended with weight 1 everywhere, is exactly LCMScheduler's img2img loop."""
    steps, shape = 4, (2, 4, 8, 8)
    original = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ours = sampler.sample(
        toy_noise_predictor, original, draw_noises(shape, steps), schedule(steps), torch.ones(steps, 1, 1, 8, 8)
    )

    scheduler = make_scheduler()
    scheduler.set_timesteps(timesteps=list(sampler.flash_timesteps(steps)))
    generator = torch.Generator().manual_seed(0)
    latents = scheduler.add_noise(original, torch.randn(shape, generator=generator), scheduler.timesteps[:1])
    for index, timestep in enumerate(scheduler.timesteps):
        latents, denoised = scheduler.step(toy_noise_predictor(latents, index), timestep, latents, generator, False)
    torch.testing.assert_close(ours, denoised, rtol=1e-5, atol=1e-5)


def test_zero_weight_returns_the_original_latent_bit_for_bit():
    steps, shape = 4, (1, 4, 8, 8)
    original = torch.randn(shape)
    out = sampler.sample(
        toy_noise_predictor, original, draw_noises(shape, steps), schedule(steps), torch.zeros(steps, 1, 1, 8, 8)
    )
    assert torch.equal(out, original)


def test_skipping_inactive_steps_changes_nothing():
    steps, shape = 4, (1, 4, 8, 8)
    original, noises, plan = torch.randn(shape), draw_noises(shape, steps), schedule(steps)
    weights = sampler.blend_weights(torch.full((8, 8), 0.3), plan)
    start = sampler.first_active_step(0.3, plan)
    assert start == 2
    full = sampler.sample(toy_noise_predictor, original, noises, plan, weights, 0)
    skipped = sampler.sample(toy_noise_predictor, original, noises, plan, weights, start)
    assert torch.equal(full, skipped)


def test_amount_of_change_grows_steadily_with_the_map_value():
    """With the ideal denoiser for Gaussian data around a target, the drift towards it rises with strength."""
    steps, shape = 4, (1, 4, 64, 64)
    plan = schedule(steps)
    original, target = torch.zeros(shape), torch.ones(shape)
    noises = draw_noises(shape, steps)

    def posterior_mean_denoiser(latents: torch.Tensor, step: int) -> torch.Tensor:
        alpha_bar = plan.alpha_bars[step]
        gain = alpha_bar**0.5 / (alpha_bar + (1 - alpha_bar))
        clean = target + gain * (latents - alpha_bar**0.5 * target)
        return (latents - alpha_bar**0.5 * clean) / (1 - alpha_bar) ** 0.5

    drifts = []
    for strength in [0.0, 0.05, 0.1, 0.2, 0.3, 0.35, 0.5, 0.6, 0.75, 0.9, 1.0]:
        weights = sampler.blend_weights(torch.full(shape[-2:], strength), plan)
        out = sampler.sample(posterior_mean_denoiser, original, noises, plan, weights)
        drifts.append((out - original).mean().item())
    assert drifts[0] == 0.0
    assert all(later > earlier for earlier, later in itertools.pairwise(drifts)), drifts


def test_guidance_at_scale_one_is_the_conditional_prediction():
    uncond, cond = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(sampler.guide(uncond, cond, 1.0), cond)


# --- The accelerators' step rules ------------------------------------------------------------------------------


RULES = {
    "lightning": {"renoise": "implied", "lcm_scalings": False},
    "tcd": {"renoise": "mixed", "lcm_scalings": False, "lcm_grid": True, "gamma": 0.3},
}


def rule_schedule(name: str, steps: int = 4) -> sampler.Schedule:
    return sampler.Schedule.from_scheduler(make_scheduler(), steps, **RULES[name]) if name != "flash" else schedule()


@pytest.mark.parametrize("steps", range(1, 9))
def test_tcd_runs_at_the_timesteps_diffusers_tcd_scheduler_picks(steps):
    scheduler = TCDScheduler(**SDXL_BETAS, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    assert sampler.lcm_grid_timesteps(steps) == tuple(scheduler.timesteps.tolist())


def test_lightning_at_full_weight_is_diffusers_trailing_euler_img2img():
    """Euler on an epsilon model steps in sigma space; the implied-noise step is the same step in alpha space, so
    the two agree to float32 rounding (not bitwise: different arithmetic)."""
    steps, shape = 4, (2, 4, 8, 8)
    original = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    noises = draw_noises(shape, steps)
    ours = sampler.sample(
        toy_noise_predictor, original, noises, rule_schedule("lightning"), torch.ones(steps, 1, 1, 8, 8)
    )

    scheduler = EulerDiscreteScheduler(**SDXL_BETAS, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    assert tuple(int(t) for t in scheduler.timesteps) == rule_schedule("lightning").timesteps
    latents = scheduler.add_noise(original, noises[0], scheduler.timesteps[:1])
    for index, timestep in enumerate(scheduler.timesteps):
        noise = toy_noise_predictor(scheduler.scale_model_input(latents, timestep), index)
        latents = scheduler.step(noise, timestep, latents).prev_sample
    torch.testing.assert_close(ours, latents, rtol=1e-4, atol=1e-4)


def test_tcd_at_full_weight_is_diffusers_tcd_img2img_up_to_its_last_noise():
    """The same fresh noise from the same generator at every step. diffusers' last TCD step returns the estimate
    noised to timestep 0 (sqrt(a_0) x0 + sqrt(1 - a_0) eps, a_0 = 0.99915: 2.9% of the noise left in); the sampler
    returns x0 itself, which is what the comparison takes from diffusers' last step."""
    steps, shape = 4, (2, 4, 8, 8)
    original = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ours = sampler.sample(
        toy_noise_predictor, original, draw_noises(shape, steps), rule_schedule("tcd"), torch.ones(steps, 1, 1, 8, 8)
    )
    scheduler = TCDScheduler(**SDXL_BETAS, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)
    latents = scheduler.add_noise(original, torch.randn(shape, generator=generator), scheduler.timesteps[:1])
    for index, timestep in enumerate(scheduler.timesteps):
        noise = toy_noise_predictor(latents, index)
        latents = scheduler.step(noise, timestep, latents, eta=0.3, generator=generator).prev_sample
    alpha_0 = float(scheduler.alphas_cumprod[0])
    clean = (latents - (1 - alpha_0) ** 0.5 * noise) / alpha_0**0.5
    torch.testing.assert_close(ours, clean, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["flash", "lightning", "tcd"])
def test_every_rule_keeps_zero_weight_exact_and_skipping_changes_nothing(name):
    steps, shape = 4, (1, 4, 8, 8)
    plan, original, noises = rule_schedule(name), torch.randn(shape), draw_noises(shape, steps)
    assert torch.equal(sampler.sample(toy_noise_predictor, original, noises, plan, torch.zeros(steps, 1, 1, 8, 8)),
                       original)  # fmt: skip
    weights = sampler.blend_weights(torch.full((8, 8), 0.3), plan)
    start = sampler.first_active_step(0.3, plan)
    assert start == 2
    full = sampler.sample(toy_noise_predictor, original, noises, plan, weights, 0)
    assert torch.equal(full, sampler.sample(toy_noise_predictor, original, noises, plan, weights, start))


@pytest.mark.parametrize("name", ["lightning", "tcd"])
def test_a_kept_pixel_s_latents_stay_the_noised_original(name):
    """Zero weight: what the model sees at each step is the original at that step's noise level (unit variance
    noise, the same as the fresh-noise rule's), so the pixels beside it are denoised in a consistent picture."""
    steps, shape = 4, (1, 4, 64, 64)
    plan, original = rule_schedule(name), torch.randn(shape)
    seen = []

    def recording_predictor(latents, step):
        seen.append(latents.clone())
        return torch.randn(latents.shape, generator=torch.Generator().manual_seed(step))

    sampler.sample(recording_predictor, original, draw_noises(shape, steps), plan, torch.zeros(steps, 1, 1, 64, 64))
    for latents, alpha in zip(seen, plan.alpha_bars, strict=True):
        noise = (latents - alpha**0.5 * original) / (1 - alpha) ** 0.5
        assert abs(noise.std().item() - 1) < 0.05 and abs(noise.mean().item()) < 0.05


@pytest.mark.parametrize("name", ["lightning", "tcd"])
def test_every_rule_s_weights_are_continuous_at_four_steps(name):
    weights = sampler.blend_weights(torch.tensor([0.30, 0.35]), rule_schedule(name))
    assert not torch.equal(weights[:, 0], weights[:, 1])
