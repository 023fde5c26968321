"""Validation of request inputs: Cog's server passes any JSON value through when it has no schema."""

import math
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .imageio import OUTPUT_FORMATS, READABLE_NAMES
from .limits import (
    MAX_GUIDANCE_SCALE,
    MAX_LORA_SCALE,
    MAX_MAP_BLUR,
    MAX_MAP_GROW,
    MAX_NUM_OUTPUTS,
    MAX_PROMPT_CHARS,
    MAX_STEPS,
    MIN_LORA_SCALE,
    MIN_STEPS,
)

MAX_SEED = 2**32 - 1
DEFAULT_PROMPT = "a high quality, detailed photograph"

JSON_KINDS = {dict: "object", list: "array", bool: "boolean", int: "number", float: "number"}
"""What a request's non-file value was, in JSON's words, for error messages."""


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


def local_file(name: str, value: Path) -> Path:
    """A file given on the command line: any readable local path (the server takes only files Cog fetched)."""
    path = Path(value).expanduser()
    if not path.is_file():
        raise InputError(f"{name}: no such file: {path}")
    return path


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    normalised = value.strip().lower() if isinstance(value, str) else value
    if normalised == "jpeg":
        normalised = "jpg"
    if normalised not in allowed:
        raise InputError(f"{name}: must be one of {', '.join(allowed)}, got {value!r}")
    return normalised


@dataclass(frozen=True)
class EditOptions:
    """Everything but the files, validated. seed is always set: drawn at random when not given."""

    prompt: str
    negative_prompt: str
    steps: int
    strength: float
    invert_map: bool
    guidance_scale: float
    num_outputs: int
    seed: int
    map_grow: int = 0
    map_blur: int = 0
    crop_to_map: bool = True
    keep_location: bool = False
    disable_safety_checker: bool = False

    @classmethod
    def from_inputs(
        cls,
        prompt: Any,
        negative_prompt: Any,
        steps: Any,
        strength: Any,
        invert_map: Any,
        guidance_scale: Any,
        num_outputs: Any,
        seed: Any,
        map_grow: Any = 0,
        map_blur: Any = 0,
        crop_to_map: Any = True,
        keep_location: Any = False,
        disable_safety_checker: Any = False,
    ) -> "EditOptions":
        return cls(
            prompt=text("prompt", prompt) or DEFAULT_PROMPT,
            negative_prompt=text("negative_prompt", negative_prompt),
            steps=integer("steps", steps, MIN_STEPS, MAX_STEPS),
            strength=number("strength", strength, 0.0, 1.0),
            invert_map=boolean("invert_map", invert_map),
            guidance_scale=number("guidance_scale", guidance_scale, 0.0, MAX_GUIDANCE_SCALE),
            num_outputs=integer("num_outputs", num_outputs, 1, MAX_NUM_OUTPUTS),
            seed=secrets.randbelow(MAX_SEED + 1) if seed is None else integer("seed", seed, 0, MAX_SEED),
            map_grow=integer("map_grow", map_grow, 0, MAX_MAP_GROW),
            map_blur=integer("map_blur", map_blur, 0, MAX_MAP_BLUR),
            crop_to_map=boolean("crop_to_map", crop_to_map),
            keep_location=boolean("keep_location", keep_location),
            disable_safety_checker=boolean("disable_safety_checker", disable_safety_checker),
        )


@dataclass(frozen=True)
class OutputOptions:
    format: str
    quality: int

    @classmethod
    def from_inputs(cls, output_format: Any, output_quality: Any) -> "OutputOptions":
        return cls(
            format=choice("output_format", output_format, OUTPUT_FORMATS),
            quality=integer("output_quality", output_quality, 1, 100),
        )


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


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA input: its name (for messages), its source text and its scale."""

    name: str
    source: str
    scale: float


@dataclass(frozen=True)
class LoraOptions:
    """The LoRA inputs, validated; the tokens never show in a repr (or a log line made from one)."""

    loras: tuple[LoraRequest, ...] = ()
    hf_token: str | None = field(default=None, repr=False)
    civitai_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_inputs(
        cls,
        lora_weights: Any = "",
        lora_scale: Any = 1.0,
        extra_lora: Any = "",
        extra_lora_scale: Any = 1.0,
        hf_api_token: Any = None,
        civitai_api_token: Any = None,
    ) -> "LoraOptions":
        loras = (
            LoraRequest("lora_weights", lora_source("lora_weights", lora_weights),
                        number("lora_scale", lora_scale, MIN_LORA_SCALE, MAX_LORA_SCALE)),
            LoraRequest("extra_lora", lora_source("extra_lora", extra_lora),
                        number("extra_lora_scale", extra_lora_scale, MIN_LORA_SCALE, MAX_LORA_SCALE)),
        )  # fmt: skip
        return cls(
            loras=tuple(lora for lora in loras if lora.source),
            hf_token=secret("hf_api_token", hf_api_token),
            civitai_token=secret("civitai_api_token", civitai_api_token),
        )
