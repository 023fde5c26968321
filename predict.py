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
MAX_EXTEND = 2048
MAX_MAP_PROMPT_CHARS = 500
MAP_DEPTH_CHOICES = ["off", "near", "far"]
OUTPUT_FORMATS = ["webp", "png", "jpg"]
MIN_LORA_SCALE = -1.0
MAX_LORA_SCALE = 3.0


class Predictor(BaseRunner):
    def setup(self, weights: str | None = None) -> None:
        """Load the weights once, from $MODEL_CACHE (default ./model-cache). weights: a trained version's LoRA (Cog
        passes $COG_WEIGHTS, which Replicate sets to the training's .tar), used when lora_weights is empty."""
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
        self.service = EditService.start(trained_lora=str(weights) if weights else None)
        self.output_dir = Path(tempfile.mkdtemp(prefix="outputs-"))

    def run(
        self,
        prompt: str = Input(
            description="What the changed areas should show.", default=DEFAULT_PROMPT, max_length=MAX_PROMPT_CHARS
        ),
        image: Path = Input(
            description="The picture to edit (PNG, JPEG, WebP, GIF, BMP, TIFF, HEIC or AVIF). Its colour profile and EXIF are kept in the outputs."
        ),
        map: Path | None = Input(  # noqa: A002 - the public input name
            description="Grayscale change map: black (up to 2 of 255) keeps a pixel exactly, white regenerates it, grey changes it partly. Any size with the image's aspect ratio; colour maps use their luminance. Optional when map_prompt, map_depth, the image's transparency or extend_* says what changes.",
            default=None,
        ),
        map_prompt: str = Input(
            description="Make the change map from words: what to change (CLIPSeg), e.g. 'the sky'. Several things separated by commas change together ('sky, water'); with a map or map_depth, only where they all say so.",
            default="",
            max_length=MAX_MAP_PROMPT_CHARS,
        ),
        map_negative_prompt: str = Input(
            description="What to keep even where the map would change it, e.g. 'person, dog' (CLIPSeg; separated by commas).",
            default="",
            max_length=MAX_MAP_PROMPT_CHARS,
        ),
        map_depth: str = Input(
            description="Make the change map from depth (Depth Anything): far changes the background most and the nearest things not at all; near the reverse.",
            default="off",
            choices=MAP_DEPTH_CHOICES,
        ),
        map_depth_range: float = Input(
            description="With map_depth: the share of the scene's depth, from the chosen end, that changes, more toward that end; 1 ramps across the whole scene, 0.3 changes only the farthest (or nearest) 30%.",
            default=1.0,
            ge=0.05,
            le=1.0,
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
        extend_left: int = Input(
            description="Outpaint: grow the canvas by this many pixels on the left (at most the image's width, and 2048); the new area is generated and a band of the image along the seam is changed partly.",
            default=0,
            ge=0,
            le=MAX_EXTEND,
        ),
        extend_right: int = Input(
            description="Outpaint on the right, as extend_left.",
            default=0,
            ge=0,
            le=MAX_EXTEND,
        ),
        extend_top: int = Input(
            description="Outpaint at the top (at most the image's height, and 2048).",
            default=0,
            ge=0,
            le=MAX_EXTEND,
        ),
        extend_bottom: int = Input(
            description="Outpaint at the bottom, as extend_top.",
            default=0,
            ge=0,
            le=MAX_EXTEND,
        ),
        return_map: bool = Input(
            description="Also return the change map actually used (after every map input, at the output's size) as the last output, a 16-bit grayscale PNG in which any pixel the map changes at all is above black.",
            default=False,
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
            description="An SDXL LoRA: an http(s) URL of a .safetensors file (Civitai download links too) or of a Replicate training's .tar, a Hugging Face repo (owner/repo, or owner/repo/path/file.safetensors), or a data URI. LoRA, LoHa, LoKr and DoRA files from diffusers, kohya, ComfyUI, LyCORIS and EriDiffusion are read. Empty for none (on a version made by a training: that training's LoRA).",
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
