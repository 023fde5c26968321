"""The request's inputs in one table (name, kind, default, bounds, description), and the options made from them.

predict.py states each input again as literal Input() arguments, because Cog's build reads the schema from that file
without running it (tests/serving/test_schema.py checks that the two agree); the command line's flags are made from this
table. Each value is checked by its kind's checker in models/validation.py.
"""

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Self

from .errors import InputError
from .limits import (
    DEFAULT_PROMPT,
    MAX_EXTEND,
    MAX_GUIDANCE_SCALE,
    MAX_LORA_SCALE,
    MAX_MAP_BLUR,
    MAX_MAP_GROW,
    MAX_MAP_PROMPT_CHARS,
    MAX_NUM_OUTPUTS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    MIN_LORA_SCALE,
    MIN_STEPS,
)
from .pictures.write import OUTPUT_FORMATS
from .validation import (
    FileCheck,
    boolean,
    choice,
    fetched_file,
    integer,
    lora_source,
    number,
    secret,
    text,
)

MAP_DEPTH_CHOICES = ("off", "near", "far")

REQUIRED = object()
"""The default of an input that has none: a file the request must give."""


@dataclass(frozen=True)
class Input:
    """One input of a request: what it is called, what it takes, and what it means."""

    name: str
    kind: str
    """text, file, integer, number, boolean, choice, secret or lora (a LoRA source)."""
    default: Any
    description: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    max_length: int | None = None

    def check(self, value: Any) -> Any:
        """The value validated (files excepted: the entry point checks those), or one InputError naming the input."""
        if self.kind == "text":  # empty text is the default: the prompt's, or nothing
            return text(self.name, value, self.max_length or MAX_PROMPT_CHARS) or self.default
        if self.kind == "integer":
            if value is None and self.default is None:  # the seed: drawn when not given
                return secrets.randbelow(int(self.high) + 1)
            return integer(self.name, value, int(self.low), int(self.high))
        if self.kind == "number":
            return number(self.name, value, self.low, self.high)
        if self.kind == "boolean":
            return boolean(self.name, value)
        if self.kind == "choice":
            return choice(self.name, value, self.choices)
        if self.kind == "secret":
            return secret(self.name, value)
        if self.kind == "lora":
            return lora_source(self.name, value)
        raise ValueError(f"{self.name}: {self.kind} inputs are checked by the entry point")


INPUTS = {
    spec.name: spec
    for spec in (
        Input("prompt", "text", DEFAULT_PROMPT, "What the changed areas should show.", max_length=MAX_PROMPT_CHARS),
        Input(
            "image",
            "file",
            REQUIRED,
            "The picture to edit (PNG, JPEG, WebP, GIF, BMP, TIFF, HEIC or AVIF). Its colour profile and EXIF are kept"
            " in the outputs.",
        ),
        Input(
            "map",
            "file",
            None,
            "Grayscale change map: black (up to 2 of 255) keeps a pixel exactly, white regenerates it, grey changes it"
            " partly. Any size with the image's aspect ratio; colour maps use their luminance. Optional when"
            " map_prompt, map_depth, the image's transparency or extend_* says what changes.",
        ),
        Input(
            "map_prompt",
            "text",
            "",
            "Make the change map from words: what to change (CLIPSeg), e.g. 'the sky'. Several things separated by"
            " commas change together ('sky, water'); with a map or map_depth, only where they all say so.",
            max_length=MAX_MAP_PROMPT_CHARS,
        ),
        Input(
            "map_negative_prompt",
            "text",
            "",
            "What to keep even where the map would change it, e.g. 'person, dog' (CLIPSeg; separated by commas).",
            max_length=MAX_MAP_PROMPT_CHARS,
        ),
        Input(
            "map_depth",
            "choice",
            "off",
            "Make the change map from depth (Depth Anything): far changes the background most and the nearest"
            " things not at all; near the reverse.",
            choices=MAP_DEPTH_CHOICES,
        ),
        Input(
            "map_depth_range",
            "number",
            1.0,
            "With map_depth: the share of the scene's depth, from the chosen end, that changes, more toward that"
            " end; 1 ramps across the whole scene, 0.3 changes only the farthest (or nearest) 30%.",
            low=0.05,
            high=1.0,
        ),
        Input("steps", "integer", 4, "Denoising steps.", low=MIN_STEPS, high=MAX_STEPS),
        Input("strength", "number", 1.0, "Scales the whole map: 0 changes nothing.", low=0.0, high=1.0),
        Input("invert_map", "boolean", False, "Invert the map, for maps in the paper's convention (white = keep)."),
        Input(
            "map_grow",
            "integer",
            0,
            "Grow the changed area by this many pixels (at the image's size) before softening: turns a tight inpainting"
            " mask into a map with room around the object.",
            low=0,
            high=MAX_MAP_GROW,
        ),
        Input(
            "map_blur",
            "integer",
            0,
            "Soften the map's edges with a Gaussian of this radius in pixels (at the image's size); pixels farther than"
            " map_grow plus 1.125 x map_blur from the changed area are still kept exactly.",
            low=0,
            high=MAX_MAP_BLUR,
        ),
        Input(
            "extend_left",
            "integer",
            0,
            "Outpaint: grow the canvas by this many pixels on the left (at most the image's width, and 2048); the new"
            " area is generated and a band of the image along the seam is changed partly.",
            low=0,
            high=MAX_EXTEND,
        ),
        Input("extend_right", "integer", 0, "Outpaint on the right, as extend_left.", low=0, high=MAX_EXTEND),
        Input(
            "extend_top",
            "integer",
            0,
            "Outpaint at the top (at most the image's height, and 2048).",
            low=0,
            high=MAX_EXTEND,
        ),
        Input("extend_bottom", "integer", 0, "Outpaint at the bottom, as extend_top.", low=0, high=MAX_EXTEND),
        Input(
            "return_map",
            "boolean",
            False,
            "Also return the change map actually used (after every map input, at the output's size) as the last"
            " output, a 16-bit grayscale PNG in which any pixel the map changes at all is above black.",
        ),
        Input(
            "crop_to_map",
            "boolean",
            True,
            "When the changed area is a small part of a large picture, edit a crop around it at full working"
            " resolution (more detail), and paste it back.",
        ),
        Input(
            "seed", "integer", None, "Random seed; leave empty for a random one (it is logged).", low=0, high=MAX_SEED
        ),
        Input("num_outputs", "integer", 1, "Number of pictures to make.", low=1, high=MAX_NUM_OUTPUTS),
        Input(
            "negative_prompt",
            "text",
            "",
            "What to avoid; used only when guidance_scale > 1.",
            max_length=MAX_PROMPT_CHARS,
        ),
        Input(
            "guidance_scale",
            "number",
            0.0,
            "Classifier-free guidance, applied only above 1 (and then it doubles the work). Flash-SDXL is trained"
            " without it: keep 0; SDXL-typical 5-8 would burn the picture, so at most 3.",
            low=0.0,
            high=MAX_GUIDANCE_SCALE,
        ),
        Input("output_format", "choice", "webp", "Format of the output pictures.", choices=OUTPUT_FORMATS),
        Input("output_quality", "integer", 90, "Quality of webp and jpg outputs.", low=1, high=100),
        Input(
            "keep_location",
            "boolean",
            False,
            "Keep the input's GPS location (EXIF and XMP) in the outputs; off by default, the rest of the EXIF is"
            " kept.",
        ),
        Input(
            "lora_weights",
            "lora",
            "",
            "An SDXL LoRA: an http(s) URL of a .safetensors file (Civitai download links too) or of a Replicate"
            " training's .tar, a Hugging Face repo (owner/repo, or owner/repo/path/file.safetensors), or a data URI."
            " LoRA, LoHa, LoKr and DoRA files from diffusers, kohya, ComfyUI, LyCORIS and EriDiffusion are read."
            " Empty for none (on a version made by a training: that training's LoRA).",
        ),
        Input(
            "lora_scale",
            "number",
            1.0,
            "Strength of lora_weights; 0 turns it off.",
            low=MIN_LORA_SCALE,
            high=MAX_LORA_SCALE,
        ),
        Input("extra_lora", "lora", "", "A second LoRA, from the same kinds of source as lora_weights."),
        Input(
            "extra_lora_scale",
            "number",
            1.0,
            "Strength of extra_lora; 0 turns it off.",
            low=MIN_LORA_SCALE,
            high=MAX_LORA_SCALE,
        ),
        Input("hf_api_token", "secret", None, "Hugging Face token, for LoRAs in gated or private repositories."),
        Input("civitai_api_token", "secret", None, "Civitai API key, for LoRAs that need one."),
        Input(
            "disable_safety_checker",
            "boolean",
            False,
            "Disable the safety checker for generated images. This feature is only available through the API.",
        ),
    )
}
"""Every input, in the order the schema shows them (prompt, image and map first)."""


class FromValues:
    """Options whose fields are inputs of a table (the predictor's, unless TABLE says another), validated from a
    request's values (absent ones take their defaults)."""

    TABLE: ClassVar[Mapping[str, Input]] = INPUTS

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Self:
        return cls(**{item.name: cls.TABLE[item.name].check(values.get(item.name, cls.TABLE[item.name].default))
                      for item in fields(cls)})  # fmt: skip


@dataclass(frozen=True)
class EditOptions(FromValues):
    """Everything the edit itself takes, validated. seed is always set: drawn at random when not given."""

    prompt: str
    negative_prompt: str
    steps: int
    strength: float
    invert_map: bool
    guidance_scale: float
    num_outputs: int
    seed: int
    map_grow: int
    map_blur: int
    map_prompt: str
    map_negative_prompt: str
    map_depth: str
    map_depth_range: float
    extend_left: int
    extend_right: int
    extend_top: int
    extend_bottom: int
    crop_to_map: bool
    keep_location: bool
    disable_safety_checker: bool


@dataclass(frozen=True)
class OutputOptions(FromValues):
    output_format: str
    output_quality: int
    return_map: bool


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA input: its name (for messages), its source text and its scale."""

    name: str
    source: str
    scale: float


@dataclass(frozen=True)
class LoraOptions(FromValues):
    """The LoRA inputs, validated; the tokens never show in a repr (or a log line made from one)."""

    lora_weights: str
    lora_scale: float
    extra_lora: str
    extra_lora_scale: float
    hf_api_token: str | None = field(repr=False)
    civitai_api_token: str | None = field(repr=False)

    @property
    def loras(self) -> tuple[LoraRequest, ...]:
        """The LoRAs given (empty sources left out), in order."""
        given = (
            LoraRequest("lora_weights", self.lora_weights, self.lora_scale),
            LoraRequest("extra_lora", self.extra_lora, self.extra_lora_scale),
        )
        return tuple(lora for lora in given if lora.source)


@dataclass(frozen=True)
class Request:
    """One request's inputs, validated: the two files, the edit, the outputs and the LoRAs."""

    image: Path
    map: Path | None
    edit: EditOptions
    output: OutputOptions
    loras: LoraOptions

    @classmethod
    def from_values(cls, values: Mapping[str, Any], file_check: FileCheck = fetched_file) -> "Request":
        """Validate every input, the files last (after the cheap checks) by the entry point's rule; the map is
        optional (what else can make one is judged with the picture, in models/maps/sources.py)."""
        unknown = sorted(set(values) - set(INPUTS))
        if unknown:
            raise InputError(f"{unknown[0]}: not an input; the inputs are {', '.join(INPUTS)}")
        edit, output, loras = (kind.from_values(values) for kind in (EditOptions, OutputOptions, LoraOptions))
        image = file_check("image", values.get("image"))
        change_map = file_check("map", values["map"]) if values.get("map") is not None else None
        return cls(image=image, map=change_map, edit=edit, output=output, loras=loras)
