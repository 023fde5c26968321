"""A training's inputs in one table, as models/inputs.py has the predictor's: train.py states each again as literal
Input() arguments for Cog's static schema reader (tests/serving/test_schema.py checks that they agree), and
scripts/train makes its flags from it."""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..errors import InputError
from ..inputs import REQUIRED, FromValues, Input
from ..limits import (
    MAX_LEARNING_RATE,
    MAX_LORA_RANK,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_TOKEN_CHARS,
    MAX_TRAINING_BATCH,
    MAX_TRAINING_IMAGES,
    MAX_TRAINING_RESOLUTION,
    MAX_TRAINING_STEPS,
    MIN_LEARNING_RATE,
    MIN_TRAINING_RESOLUTION,
)
from ..validation import FileCheck, fetched_file

TOKEN_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
RESOLUTION_MULTIPLE = 64

TRAINING_INPUTS = {
    spec.name: spec
    for spec in (
        Input(
            "input_images",
            "file",
            REQUIRED,
            f"A .zip or .tar of 1 to {MAX_TRAINING_IMAGES} photos (PNG, JPEG, WebP, GIF, BMP, TIFF, HEIC or AVIF), each"
            " optionally with a caption: a .txt of the same name beside it.",
        ),
        Input(
            "token",
            "text",
            "TOK",
            "The word that stands for your subject in prompts: it gets two new trained tokens, and prompts that say it"
            " call them.",
            max_length=MAX_TOKEN_CHARS,
        ),
        Input(
            "caption_prefix",
            "text",
            "a photo of TOK,",
            "Put before each caption that does not already say the token; a photo without a caption is trained with"
            " this alone. The default says your token.",
            max_length=MAX_PROMPT_CHARS,
        ),
        Input(
            "mask_prompt",
            "text",
            "",
            "What your subject is, e.g. 'a face' or 'a bottle' (CLIPSeg): the loss is weighted to where each photo"
            " shows it, so backgrounds are not learned. Empty: every pixel counts the same.",
            max_length=MAX_PROMPT_CHARS,
        ),
        Input("steps", "integer", 1000, "Training steps.", low=1, high=MAX_TRAINING_STEPS),
        Input(
            "learning_rate",
            "number",
            1e-4,
            "The LoRA's learning rate (AdamW).",
            low=MIN_LEARNING_RATE,
            high=MAX_LEARNING_RATE,
        ),
        Input(
            "lora_rank",
            "integer",
            32,
            "The LoRA's rank: higher learns more detail, and makes a larger file.",
            low=1,
            high=MAX_LORA_RANK,
        ),
        Input("batch_size", "integer", 1, "Photos per step.", low=1, high=MAX_TRAINING_BATCH),
        Input(
            "resolution",
            "integer",
            1024,
            "Training size, a multiple of 64: photos go to the aspect bucket of about this many pixels squared nearest"
            " their own aspect ratio (from 1:2.5 to 2.5:1), scaled and centre-cropped to it.",
            low=MIN_TRAINING_RESOLUTION,
            high=MAX_TRAINING_RESOLUTION,
        ),
        Input(
            "train_text_encoder",
            "boolean",
            False,
            "Also train LoRAs on both text encoders (the token's own embeddings are always trained).",
        ),
        Input(
            "seed",
            "integer",
            None,
            "Random seed; the same seed and inputs train the same LoRA. Leave blank to draw one.",
            low=0,
            high=MAX_SEED,
        ),
        Input(
            "validation_prompt",
            "text",
            "",
            "The prompt of the sample pictures made during training (SDXL base with the LoRA, 25 steps). Empty: the"
            " caption prefix alone.",
            max_length=MAX_PROMPT_CHARS,
        ),
        Input(
            "sample_every",
            "integer",
            250,
            "Make a sample picture every this many steps (0: only at the end); samples go into the .tar and the log.",
            low=0,
            high=MAX_TRAINING_STEPS,
        ),
    )
}
"""Every input of a training, in the order the schema shows them."""


@dataclass(frozen=True)
class TrainingOptions(FromValues):
    """A training's inputs other than the photos, validated; seed is always set (drawn when not given)."""

    TABLE: ClassVar[Mapping[str, Input]] = TRAINING_INPUTS

    token: str
    caption_prefix: str
    mask_prompt: str
    steps: int
    learning_rate: float
    lora_rank: int
    batch_size: int
    resolution: int
    train_text_encoder: bool
    seed: int
    validation_prompt: str
    sample_every: int

    def __post_init__(self) -> None:
        if not TOKEN_PATTERN.fullmatch(self.token):
            raise InputError(f"token: one word of letters, digits and _ (starting with a letter), got {self.token!r}")
        default_prefix = TRAINING_INPUTS["caption_prefix"].default
        if self.caption_prefix == default_prefix:  # the default names the token, whichever it is
            object.__setattr__(self, "caption_prefix", default_prefix.replace("TOK", self.token))
        if self.resolution % RESOLUTION_MULTIPLE:
            raise InputError(f"resolution: must be a multiple of {RESOLUTION_MULTIPLE}, got {self.resolution}")


@dataclass(frozen=True)
class TrainingRequest:
    input_images: Path
    options: TrainingOptions

    @classmethod
    def from_values(cls, values: Mapping[str, Any], file_check: FileCheck = fetched_file) -> "TrainingRequest":
        """Validate every input, the archive last (after the cheap checks)."""
        unknown = sorted(set(values) - set(TRAINING_INPUTS))
        if unknown:
            raise InputError(f"{unknown[0]}: not an input of a training; they are {', '.join(TRAINING_INPUTS)}")
        options = TrainingOptions.from_values(values)
        if values.get("input_images") is None:
            raise InputError("input_images: required; give a .zip or .tar of photos")
        return cls(file_check("input_images", values["input_images"]), options)
