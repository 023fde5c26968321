"""Cog entry point: the inputs as Cog's schema shows them, validated and served by one call of the `models` package."""

import logging
import sys
import tempfile

from cog import BaseRunner, Input, Path, Secret

from models.inputs import Request
from models.service import EditService

# Cog's build reads the schema from this file without running it: every Input() argument below is a literal or one
# of these literal constants (imported names are not resolved). tests/serving/test_schema.py checks that they equal the
# table of inputs in models/inputs.py, which the package validates against at run time.
DEFAULT_PROMPT = "a high quality, detailed photograph"
MAX_PROMPT_CHARS = 2000
MIN_STEPS = 1
MAX_STEPS = 16
MAX_NUM_OUTPUTS = 4
MAX_SEED = 4294967295
MAX_GUIDANCE_SCALE = 3.0
MAX_MAP_GROW = 256
MAX_MAP_BLUR = 256
OUTPUT_FORMATS = ["webp", "png", "jpg"]
MIN_LORA_SCALE = -1.0
MAX_LORA_SCALE = 3.0


class Predictor(BaseRunner):
    def setup(self) -> None:
        """Load the weights once, from $MODEL_CACHE (default ./model-cache)."""
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
        self.service = EditService.start()
        self.output_dir = Path(tempfile.mkdtemp(prefix="outputs-"))

    def run(
        self,
        prompt: str = Input(
            description="What the changed areas should show.", default=DEFAULT_PROMPT, max_length=MAX_PROMPT_CHARS
        ),
        image: Path = Input(
            description="The picture to edit (PNG, JPEG, WebP, GIF, BMP, TIFF, HEIC or AVIF). Its colour profile and EXIF are kept in the outputs."
        ),
        map: Path = Input(  # noqa: A002 - the public input name
            description="Grayscale change map: black keeps a pixel exactly, white regenerates it, grey changes it partly. Any size with the image's aspect ratio; colour maps use their luminance."
        ),
        steps: int = Input(description="Denoising steps.", default=4, ge=MIN_STEPS, le=MAX_STEPS),
        strength: float = Input(description="Scales the whole map: 0 changes nothing.", default=1.0, ge=0.0, le=1.0),
        invert_map: bool = Input(
            description="Invert the map, for maps in the paper's convention (white = keep).", default=False
        ),
        map_grow: int = Input(
            description="Grow the changed area by this many pixels (at the image's size) before softening: turns a tight inpainting mask into a map with room around the object.",
            default=0,
            ge=0,
            le=MAX_MAP_GROW,
        ),
        map_blur: int = Input(
            description="Soften the map's edges with a Gaussian of this radius in pixels (at the image's size); pixels farther than map_grow plus 1.125 x map_blur from the changed area are still kept exactly.",
            default=0,
            ge=0,
            le=MAX_MAP_BLUR,
        ),
        crop_to_map: bool = Input(
            description="When the changed area is a small part of a large picture, edit a crop around it at full working resolution (more detail), and paste it back.",
            default=True,
        ),
        seed: int | None = Input(
            description="Random seed; leave empty for a random one (it is logged).", default=None, ge=0, le=MAX_SEED
        ),
        num_outputs: int = Input(description="Number of pictures to make.", default=1, ge=1, le=MAX_NUM_OUTPUTS),
        negative_prompt: str = Input(
            description="What to avoid; used only when guidance_scale > 1.", default="", max_length=MAX_PROMPT_CHARS
        ),
        guidance_scale: float = Input(
            description="Classifier-free guidance, applied only above 1 (and then it doubles the work). Flash-SDXL is trained without it: keep 0; SDXL-typical 5-8 would burn the picture, so at most 3.",
            default=0.0,
            ge=0.0,
            le=MAX_GUIDANCE_SCALE,
        ),
        output_format: str = Input(
            description="Format of the output pictures.", default="webp", choices=OUTPUT_FORMATS
        ),
        output_quality: int = Input(description="Quality of webp and jpg outputs.", default=90, ge=1, le=100),
        keep_location: bool = Input(
            description="Keep the input's GPS location (EXIF and XMP) in the outputs; off by default, the rest of the EXIF is kept.",
            default=False,
        ),
        lora_weights: str = Input(
            description="An SDXL LoRA: an http(s) URL of a .safetensors file (Civitai download links too) or of a Replicate training's .tar, a Hugging Face repo (owner/repo, or owner/repo/path/file.safetensors), or a data URI. LoRA, LoHa, LoKr and DoRA files from diffusers, kohya, ComfyUI, LyCORIS and EriDiffusion are read. Empty for none.",
            default="",
        ),
        lora_scale: float = Input(
            description="Strength of lora_weights; 0 turns it off.", default=1.0, ge=MIN_LORA_SCALE, le=MAX_LORA_SCALE
        ),
        extra_lora: str = Input(
            description="A second LoRA, from the same kinds of source as lora_weights.", default=""
        ),
        extra_lora_scale: float = Input(
            description="Strength of extra_lora; 0 turns it off.", default=1.0, ge=MIN_LORA_SCALE, le=MAX_LORA_SCALE
        ),
        hf_api_token: Secret | None = Input(
            description="Hugging Face token, for LoRAs in gated or private repositories.", default=None
        ),
        civitai_api_token: Secret | None = Input(description="Civitai API key, for LoRAs that need one.", default=None),
        disable_safety_checker: bool = Input(
            description="Disable the safety checker for generated images. This feature is only available through the API.",
            default=False,
        ),
    ) -> list[Path]:
        values = dict(locals())  # every argument but self is an input of models.inputs.INPUTS
        del values["self"]
        prediction = self.service.run_into(Request.from_values(values), self.output_dir)
        self.record_metric("timings", prediction.timings)
        return [Path(path) for path in prediction.paths]
