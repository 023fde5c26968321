"""What a LoRA file is, in words and figures: its naming, the layers it changes by part of SDXL, its kinds of update,
ranks and scales, the tokens it brings, and the memory a merge would keep (scripts/lora-info prints it)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from .formats import IGNORED_PREFIXES, LoraContents
from .names import Targets
from .tokens import BUNDLE_PREFIX

NAMINGS = (
    (("lycoris_",), "SimpleTuner's LyCORIS names (lycoris_)"),
    (("lora_unet_", "lora_te1_", "lora_te2_"), "kohya's names (lora_unet_, lora_te1_, lora_te2_): kohya, LyCORIS,"
     " OneTrainer, ai-toolkit"),
    (("model.diffusion_model.", "conditioner."), "the single-file checkpoint's own names (model.diffusion_model.):"
     " EriDiffusion v1"),
    (("diffusion_model.", "text_encoders."), "ComfyUI's names (diffusion_model., text_encoders.): ComfyUI,"
     " OneTrainer's ComfyUI output"),
    (("base_model.model.",), "peft's save_pretrained names (base_model.model.)"),
    (("unet.", "text_encoder.", "text_encoder_2."), "diffusers' names (unet., text_encoder., text_encoder_2.)"),
)  # fmt: skip
"""A key's prefix and the naming it belongs to, checked in order (the longest of overlapping prefixes first)."""

SGM_WORDS = ("input_blocks", "middle_block", "output_blocks", "time_embed_", "time_embed.", "label_emb", "_out_2",
             ".out.2")  # fmt: skip
"""Block names only the single-file (SGM) UNet has."""

COMPONENT_NAMES = {"unet": "UNet", "text_encoder": "text encoder 1", "text_encoder_2": "text encoder 2"}
KIND_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "diff": "full differences"}


def naming(keys: Iterable[str]) -> str:
    """The naming a file's keys follow: prefix family and block names."""
    keys = [key for key in keys if not key.startswith((*IGNORED_PREFIXES, BUNDLE_PREFIX))]
    named = next((what for prefixes, what in NAMINGS if any(key.startswith(prefixes) for key in keys)), None)
    if named is None:
        processors = any(".processor." in key for key in keys)
        named = "attention processors, no prefix (Replicate's SDXL trainings)" if processors else "no prefix"
    elif any(".processor." in key for key in keys):
        named = "attention processors under unet. (diffusers 0.19)"
    blocks = "SGM block names" if any(word in key for key in keys for word in SGM_WORDS) else "diffusers block names"
    return f"{named}; {blocks}"


def part(component: str, module: str) -> str:
    """Which part of SDXL a layer belongs to, in the words people use for LoRA targets."""
    if component != "unet":
        return COMPONENT_NAMES[component]
    if ".attn" in module:
        return "UNet attention"
    if ".ff." in module:
        return "UNet feed-forward"
    if module.endswith(("proj_in", "proj_out")):
        return "UNet attention in/out projections"
    if ".resnets." in module:
        return "UNet resnets"
    if "samplers." in module or module in ("conv_in", "conv_out"):
        return "UNet other convolutions"
    if module.startswith(("time_embedding", "add_embedding")):
        return "UNet time and size embeddings"
    return "UNet norms"


@dataclass
class LoraSummary:
    naming: str
    parameters: int
    parts: dict[str, int]
    """Parameters changed, by part of SDXL."""
    kinds: dict[str, int]
    ranks: list[int]
    scales: list[dict[str, float | None]]
    """The distinct (alpha, effective scale) pairs."""
    dora: int
    tokens: list[dict[str, object]]
    copy_bytes: dict[str, int]
    """Memory the copies of the changed parameters would take: float32 (a CPU) and 16-bit (a GPU)."""

    def lines(self) -> list[str]:
        scales = ", ".join(
            f"alpha {scale['alpha']:g} -> {scale['scale']:g}" if scale["alpha"] is not None else "1 (no alpha)"
            for scale in self.scales
        )
        return [
            f"naming: {self.naming}",
            f"changes {self.parameters} parameters: "
            + ", ".join(f"{name} {count}" for name, count in sorted(self.parts.items())),
            "kinds: "
            + ", ".join(f"{name} {count}" for name, count in self.kinds.items())
            + (f" ({self.dora} with DoRA)" if self.dora else ""),
            f"rank: {', '.join(map(str, self.ranks)) or 'none (full)'}; scale (alpha / rank): {scales}",
            "trained tokens: "
            + (", ".join(f"{entry['trigger']!r} -> {''.join(entry['tokens'])}" for entry in self.tokens) or "none"),
            f"copies a merge keeps: {self.copy_bytes['16-bit'] / 2**30:.2f} GiB in bf16/fp16 (GPU); on a CPU up to"
            f" {self.copy_bytes['float32'] / 2**30:.2f} GiB (float32, 16 bits where a weight holds 16-bit values)",
        ]

    def to_json(self) -> dict:
        return asdict(self)


def summarise(keys: Iterable[str], contents: LoraContents, targets: Targets) -> LoraSummary:
    updates = contents.updates
    changed = {(update.component, update.module, update.parameter) for update in updates}
    values = sum(targets.parameter(*target).numel() for target in changed)
    scales = sorted({(update.alpha, update.scaling) for update in updates if update.kind != "diff"}, key=str)
    kinds = Counter(update.kind for update in updates)
    return LoraSummary(
        naming=naming(keys),
        parameters=len(updates),
        parts=dict(Counter(part(update.component, update.module) for update in updates)),
        kinds={name: count for kind, name in KIND_NAMES.items() if (count := kinds[kind])},
        ranks=sorted({update.rank for update in updates if update.rank}),
        scales=[{"alpha": alpha, "scale": scale} for alpha, scale in scales],
        dora=sum(update.magnitude is not None for update in updates),
        tokens=[{"trigger": entry.trigger, "tokens": list(entry.tokens)} for entry in contents.token_sets],
        copy_bytes={"float32": values * 4, "16-bit": values * 2},
    )
