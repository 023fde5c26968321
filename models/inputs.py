"""The request's inputs in one table (name, kind, default, bounds, description), and their validation.

predict.py states each input again as literal Input() arguments, because Cog's build reads the schema from that file
without running it (tests/serving/test_schema.py checks that the two agree); the command line's flags are made from this
table. Validation does not rely on Cog's schema: a server started without one passes any JSON value through.
"""

import math
import secrets
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Self

from .errors import InputError
from .limits import (
    DEFAULT_PROMPT,
    MAX_GUIDANCE_SCALE,
    MAX_LORA_SCALE,
    MAX_MAP_BLUR,
    MAX_MAP_GROW,
    MAX_NUM_OUTPUTS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    MIN_LORA_SCALE,
    MIN_STEPS,
)
from .pictures.read import READABLE_NAMES
from .pictures.write import OUTPUT_FORMATS

JSON_KINDS = {dict: "object", list: "array", bool: "boolean", int: "number", float: "number"}
"""What a request's non-file value was, in JSON's words, for error messages."""

FileCheck = Callable[[str, Any], Path]
"""How an entry point turns a file input into a path it may read: `fetched_file` for the server, `local_file` for
the command line."""


def integer(name: str, value: Any, low: int, high: int) -> int:
    """An int (or an integral float such as 4.0) within [low, high]."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"{name}: must be a whole number from {low} to {high}, got {value!r}")
    return value


def number(name: str, value: Any, low: float, high: float) -> float:
    """A finite int or float within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{name}: must be a number from {low:g} to {high:g}, got {value!r}")
    if not low <= value <= high:
        raise InputError(f"{name}: must be from {low:g} to {high:g}, got {value!r}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name}: must be true or false, got {value!r}")
    return value


def text(name: str, value: Any, max_chars: int = MAX_PROMPT_CHARS) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{name}: must be text, got {value!r}")
    if len(value) > max_chars:
        raise InputError(f"{name}: at most {max_chars} characters, got {len(value)}")
    return value.strip()


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    normalised = value.strip().lower() if isinstance(value, str) else value
    if normalised == "jpeg":
        normalised = "jpg"
    if normalised not in allowed:
        raise InputError(f"{name}: must be one of {', '.join(allowed)}, got {value!r}")
    return normalised


def secret(name: str, value: Any) -> str | None:
    """A token given as a Cog Secret (or plain text, from the command line); None when not given."""
    if value is None:
        return None
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    if not isinstance(value, str):
        raise InputError(f"{name}: must be text, got a JSON {JSON_KINDS.get(type(value), type(value).__name__)}")
    return value.strip() or None


def lora_source(name: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{name}: must be text (a URL, a Hugging Face repo or a data URI), got {value!r}")
    return value.strip()


def fetched_file(name: str, value: Any) -> Path:
    """A file Cog fetched for this request, which always lies directly in the temporary folder.

    Cog turns data URIs and http(s) URLs into such files. Anything else (a path on the server, a file://
    URL, a link) is refused before it is opened, so a request can never make the predictor read the
    container's files or the outputs of earlier requests, which lie in a subfolder.
    """
    if value is None:
        raise InputError(f"{name}: required; give a picture file ({READABLE_NAMES})")
    allowed = f"{name}: give a file (an upload, a data URI or an http(s) URL)"
    if isinstance(value, str):
        raise InputError(f"{allowed}; paths and other text are not accepted")
    if not isinstance(value, Path):
        kind = JSON_KINDS.get(type(value), type(value).__name__)
        raise InputError(f"{allowed}, not a JSON {kind}")
    path = Path(value)
    temporary_folder = Path(tempfile.gettempdir()).resolve()
    if path.is_symlink() or not path.is_file() or path.resolve().parent != temporary_folder:
        raise InputError(f"{allowed}, not a path on the server")
    return path


def local_file(name: str, value: Any) -> Path:
    """A file given on the command line: any readable local path (the server takes only files Cog fetched)."""
    if value is None:
        raise InputError(f"{name}: required; give a picture file ({READABLE_NAMES})")
    path = Path(value).expanduser()
    if not path.is_file():
        raise InputError(f"{name}: no such file: {path}")
    return path


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
            REQUIRED,
            "Grayscale change map: black keeps a pixel exactly, white regenerates it, grey changes it partly. Any size"
            " with the image's aspect ratio; colour maps use their luminance.",
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
            " Empty for none.",
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
    """Options whose fields are inputs of the table, validated from a request's values (absent ones take their
    defaults)."""

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Self:
        return cls(**{item.name: INPUTS[item.name].check(values.get(item.name, INPUTS[item.name].default))
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
    crop_to_map: bool
    keep_location: bool
    disable_safety_checker: bool


@dataclass(frozen=True)
class OutputOptions(FromValues):
    output_format: str
    output_quality: int


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
    map: Path
    edit: EditOptions
    output: OutputOptions
    loras: LoraOptions

    @classmethod
    def from_values(cls, values: Mapping[str, Any], file_check: FileCheck = fetched_file) -> "Request":
        """Validate every input, the files last (after the cheap checks) by the entry point's rule."""
        unknown = sorted(set(values) - set(INPUTS))
        if unknown:
            raise InputError(f"{unknown[0]}: not an input; the inputs are {', '.join(INPUTS)}")
        edit, output, loras = (kind.from_values(values) for kind in (EditOptions, OutputOptions, LoraOptions))
        image, change_map = (file_check(name, values.get(name)) for name in ("image", "map"))
        return cls(image=image, map=change_map, edit=edit, output=output, loras=loras)
