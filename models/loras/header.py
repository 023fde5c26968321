"""What a LoRA file's header says besides its tensors' names: alphas and peft options, read as untrusted data.

Every field is checked before use: JSON is parsed within the header's size and refused when nested too deeply;
numbers must be finite and within MAX_LORA_ALPHA; peft's `alpha_pattern` keys must be plain module names. peft treats
those keys as regular expressions; running a file's expression could take exponential time (and a worker stuck in
one C call cannot be cancelled), so here a key is a module name matched as peft would match it, the name itself or
its last dotted parts, and any other key refuses the file.
"""

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from ..limits import MAX_LORA_ALPHA

PLAIN_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
"""A module path: dot-separated names; matched with fullmatch, whose time is linear (the dots make it unambiguous)."""

MAX_PATTERN_CHARS = 300


class LoraError(ValueError):
    """A LoRA file that cannot be applied to SDXL; the message says why in one line (callers add the input's name)."""


def json_field(name: str, text: Any) -> Any:
    """A header field holding JSON, parsed; a field that is not text or not JSON, or nests too deeply, is refused."""
    if not isinstance(text, str):
        raise LoraError(f"the header's {name} is not text")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise LoraError(f"the header's {name} is not valid JSON (or nests too deeply)") from None


def finite_number(name: str, value: Any) -> float:
    """A number a file states for an alpha: finite, at most MAX_LORA_ALPHA in size (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LoraError(f"{name} is not a number")
    try:
        number = float(value)
    except OverflowError:
        raise LoraError(f"{name} is too large a number") from None
    if not math.isfinite(number) or abs(number) > MAX_LORA_ALPHA:
        raise LoraError(f"{name} is {value!r}; alphas are finite numbers up to {MAX_LORA_ALPHA:g}")
    return number


def lenient_number(name: str, text: Any) -> float | None:
    """A number written as text (kohya's ss_network_alpha), None when the text is no number at all ("None",
    "Dynamic"); a number that is not finite or too large is refused."""
    try:
        value = float(text) if isinstance(text, str | int | float) and not isinstance(text, bool) else None
    except ValueError:
        return None
    except OverflowError:
        raise LoraError(f"{name} is too large a number") from None
    return None if value is None else finite_number(name, value)


def pattern_key(name: str) -> str:
    if not isinstance(name, str) or len(name) > MAX_PATTERN_CHARS or not PLAIN_MODULE_NAME.fullmatch(name):
        shown = str(name)[:60]
        raise LoraError(
            f"alpha_pattern key {shown!r} is not a plain module name; only module names are read (a file's regular"
            " expressions are never run)"
        )
    return name


def matches(module: str, key: str) -> bool:
    """peft's rule for a plain key: the module's name is the key, or ends with "." and the key."""
    return module == key or module.endswith("." + key)


class Metadata:
    """Alphas and options that a file's header gives instead of `.alpha` tensors, validated on reading."""

    def __init__(self, header: Mapping[str, Any] | None):
        header = dict(header or {})
        self.peft: dict[str, dict[str, Any]] = {}
        if "lora_adapter_metadata" in header:
            adapter = json_field("lora_adapter_metadata", header["lora_adapter_metadata"])
            if not isinstance(adapter, dict):
                raise LoraError("the header's lora_adapter_metadata is not a JSON object")
            for key, value in adapter.items():
                component, _, option = key.partition(".")
                self.peft.setdefault(component, {})[option] = self.option(key, option, value)
        checkpoint = {}
        if "__eridiffusion_ckpt__" in header:
            checkpoint = json_field("__eridiffusion_ckpt__", header["__eridiffusion_ckpt__"])
            if not isinstance(checkpoint, dict):
                raise LoraError("the header's __eridiffusion_ckpt__ is not a JSON object")
        self.file_alpha = None
        if "alpha" in checkpoint:
            self.file_alpha = finite_number("the header's alpha", checkpoint["alpha"])
        else:
            for key in ("alpha", "ss_network_alpha"):
                if key in header:
                    self.file_alpha = lenient_number(f"the header's {key}", header[key])
                    break

    @staticmethod
    def option(key: str, option: str, value: Any) -> Any:
        """A peft option the merge reads, checked; the others are kept as they are and never used."""
        if option == "lora_alpha":
            return finite_number(f"the header's {key}", value)
        if option == "alpha_pattern":
            if not isinstance(value, dict):
                raise LoraError(f"the header's {key} is not a JSON object")
            return {pattern_key(name): finite_number(f"{key}[{name!r}]", alpha) for name, alpha in value.items()}
        if option == "use_rslora" and not isinstance(value, bool):
            raise LoraError(f"the header's {key} is not true or false")
        return value

    def alpha(self, component: str, module: str) -> float | None:
        config = self.peft.get(component, {})
        for key, alpha in (config.get("alpha_pattern") or {}).items():
            if matches(module, key):
                return alpha
        if "lora_alpha" in config:
            return config["lora_alpha"]
        return self.file_alpha

    def rank_stabilised(self, component: str) -> bool:
        return bool(self.peft.get(component, {}).get("use_rslora"))
