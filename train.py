"""Cog's training entry point (cog.yaml `train:`, served at /trainings): the inputs as Cog's schema shows them, and one
call of models.training.

A function rather than a class with setup(): Replicate runs each training in a container of its own, so a setup that
outlived one training would save nothing, and coglet 0.23.1 refuses a trainer class without a run() method ("run or
predict method not found"), although Cog's docs show one.
"""

import logging
import sys
import tempfile

from cog import BaseModel, Input, Path

from models.training.inputs import TrainingRequest
from models.training.run import train_into

# Cog's build reads the schema from this file without running it: every Input() argument below is a literal or one
# of these literal constants. tests/serving/test_schema.py checks them against models/training/inputs.py's table.
MAX_TRAINING_STEPS = 10000
MAX_LORA_RANK = 128
MAX_TRAINING_BATCH = 8
MIN_TRAINING_RESOLUTION = 256
MAX_TRAINING_RESOLUTION = 1536
MIN_LEARNING_RATE = 1e-06
MAX_LEARNING_RATE = 0.01
MAX_SEED = 4294967295
MAX_PROMPT_CHARS = 2000
MAX_TOKEN_CHARS = 32


class TrainingOutput(BaseModel):
    weights: Path


def train(
    input_images: Path = Input(
        description="A .zip or .tar of 1 to 300 photos (PNG, JPEG, WebP, GIF, BMP, TIFF, HEIC or AVIF), each optionally with a caption: a .txt of the same name beside it."
    ),
    token: str = Input(
        description="The word that stands for your subject in prompts: it gets two new trained tokens, and prompts that say it call them.",
        default="TOK",
        max_length=MAX_TOKEN_CHARS,
    ),
    caption_prefix: str = Input(
        description="Put before each caption that does not already say the token; a photo without a caption is trained with this alone. The default says your token.",
        default="a photo of TOK,",
        max_length=MAX_PROMPT_CHARS,
    ),
    mask_prompt: str = Input(
        description="What your subject is, e.g. 'a face' or 'a bottle' (CLIPSeg): the loss is weighted to where each photo shows it, so backgrounds are not learned. Empty: every pixel counts the same.",
        default="",
        max_length=MAX_PROMPT_CHARS,
    ),
    steps: int = Input(description="Training steps.", default=1000, ge=1, le=MAX_TRAINING_STEPS),
    learning_rate: float = Input(
        description="The LoRA's learning rate (AdamW).", default=0.0001, ge=MIN_LEARNING_RATE, le=MAX_LEARNING_RATE
    ),
    lora_rank: int = Input(
        description="The LoRA's rank: higher learns more detail, and makes a larger file.",
        default=32,
        ge=1,
        le=MAX_LORA_RANK,
    ),
    batch_size: int = Input(description="Photos per step.", default=1, ge=1, le=MAX_TRAINING_BATCH),
    resolution: int = Input(
        description="Training size, a multiple of 64: photos go to the aspect bucket of about this many pixels squared nearest their own aspect ratio (from 1:2.5 to 2.5:1), scaled and centre-cropped to it.",
        default=1024,
        ge=MIN_TRAINING_RESOLUTION,
        le=MAX_TRAINING_RESOLUTION,
    ),
    train_text_encoder: bool = Input(
        description="Also train LoRAs on both text encoders (the token's own embeddings are always trained).",
        default=False,
    ),
    seed: int | None = Input(
        description="Random seed; the same seed and inputs train the same LoRA. Leave blank to draw one.",
        default=None,
        ge=0,
        le=MAX_SEED,
    ),
    validation_prompt: str = Input(
        description="The prompt of the sample pictures made during training (SDXL base with the LoRA, 25 steps). Empty: the caption prefix alone.",
        default="",
        max_length=MAX_PROMPT_CHARS,
    ),
    sample_every: int = Input(
        description="Make a sample picture every this many steps (0: only at the end); samples go into the .tar and the log.",
        default=250,
        ge=0,
        le=MAX_TRAINING_STEPS,
    ),
) -> TrainingOutput:
    values = dict(locals())  # every argument is an input of models.training.inputs.TRAINING_INPUTS
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    result = train_into(TrainingRequest.from_values(values), Path(tempfile.gettempdir()) / "trainings")
    return TrainingOutput(weights=Path(result.tar))
