"""The few-step accelerators a weights folder can be built with: a LoRA fused into SDXL at load, and the step rule
the sampler runs for it (models/sampler.py). Licences from the model cards; not legal advice."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Accelerator:
    name: str
    title: str
    repo: str
    weight_name: str
    licence: str
    renoise: str
    """How the sampler goes from one step's estimate to the next timestep (models/sampler.py): fresh, implied or
    mixed."""
    trained_steps: tuple[int, ...]
    """The step counts the LoRA is made for; others get a warning."""
    lcm_scalings: bool = False
    """LCM's boundary scalings on the model's estimate (c_skip, c_out), or the plain x0 estimate."""
    lcm_grid: bool = False
    """Timesteps from LCM's 50-step distillation grid (TCD's), else evenly spaced from the last (Flash's, and
    Euler's trailing spacing)."""
    gamma: float = 0.0
    """TCD's gamma (diffusers' eta): the share of each step's noise drawn fresh."""

    @property
    def trained_for(self) -> str:
        """Its step counts in words: "4", "2 to 8"."""
        steps = self.trained_steps
        return str(steps[0]) if len(steps) == 1 else f"{steps[0]} to {steps[-1]}"

    @property
    def step_rule(self) -> dict:
        """The sampler's settings for it (models/sampler.py's Schedule.from_scheduler)."""
        return {"renoise": self.renoise, "lcm_scalings": self.lcm_scalings, "lcm_grid": self.lcm_grid,
                "gamma": self.gamma}  # fmt: skip

    @property
    def folder(self) -> str:
        """Where its LoRA file lies in the weights folder, unmodified."""
        return f"{self.name}-lora"


ACCELERATORS = {
    accelerator.name: accelerator
    for accelerator in (
        Accelerator(
            "flash", "Flash-SDXL", "jasperai/flash-sdxl", "pytorch_lora_weights.safetensors",
            "CC BY-NC-ND 4.0: non-commercial, no derivatives", renoise="fresh", trained_steps=(4,),
            lcm_scalings=True,
        ),
        Accelerator(
            "lightning", "SDXL-Lightning", "ByteDance/SDXL-Lightning", "sdxl_lightning_4step_lora.safetensors",
            "CreativeML Open RAIL++-M: commercial use, with its use restrictions passed on", renoise="implied",
            trained_steps=(4,),
        ),
        Accelerator(
            "tcd", "TCD", "h1t/TCD-SDXL-LoRA", "pytorch_lora_weights.safetensors", "MIT: keep its notice",
            renoise="mixed", trained_steps=tuple(range(2, 9)), lcm_grid=True, gamma=0.3,
        ),
    )
}  # fmt: skip
"""Flash-SDXL (the default), SDXL-Lightning's 4-step LoRA and TCD."""

DEFAULT_ACCELERATOR = "flash"
