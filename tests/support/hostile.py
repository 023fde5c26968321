"""Hostile LoRA files: valid files with one field made dangerous, and raw safetensors headers no writer would make."""

import json
import struct

import torch
from safetensors.torch import save

from tests.support.loras import lora_file

REDOS_PATTERN = "(a+)+$"
"""A regular expression whose backtracking is exponential in the length of a non-matching name."""


def raw_safetensors(header: dict, body: bytes = b"") -> bytes:
    """A safetensors file from a header of our own making (the library refuses to write most of these)."""
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + body


def peft_lora(models: dict, metadata_changes: dict | None = None, header_changes: dict | None = None) -> bytes:
    """A valid peft-layout LoRA, its lora_adapter_metadata (a JSON object) and header changed as given."""
    tensors, header, _ = lora_file(models, "peft")
    adapter = json.loads(header["lora_adapter_metadata"]) | (metadata_changes or {})
    header = {**header, "lora_adapter_metadata": json.dumps(adapter), **(header_changes or {})}
    return save(tensors, header)


def kohya_lora(models: dict, change=None) -> bytes:
    """A valid kohya-layout LoRA; change(tensors) edits its tensors first."""
    tensors, header, _ = lora_file(models, "kohya")
    if change is not None:
        change(tensors)
    return save(tensors, header)


def first_key(tensors: dict, ending: str) -> str:
    return next(key for key in sorted(tensors) if key.endswith(ending))


def zero_size_tensors(count: int) -> bytes:
    """A header listing `count` zero-size tensors: a file of megabytes that asks for a tensor per key."""
    header = {f"t{index}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for index in range(count)}
    return raw_safetensors(header)


def largest_header_allowed() -> bytes:
    """Just inside both header limits: 29,999 tensors with names of about 220 characters, in 7.8 MiB."""
    name = "lora_unet_" + "x" * 190
    return raw_safetensors({f"{name}{index}.lora_down.weight": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                            for index in range(29_999)})  # fmt: skip


def hostile_files(models: dict) -> dict[str, tuple[bytes, str]]:
    """name -> (file, what its one-line refusal says)."""

    def nan_in_up(tensors: dict) -> None:
        tensors[first_key(tensors, ".lora_up.weight")][0, 0] = float("nan")

    def infinite_alpha(tensors: dict) -> None:
        tensors[first_key(tensors, ".alpha")] = torch.tensor(float("inf"))

    def empty_alpha(tensors: dict) -> None:
        tensors[first_key(tensors, ".alpha")] = torch.zeros(0)

    deep = "[" * 100_000 + "]" * 100_000
    return {
        "redos-alpha-pattern": (
            peft_lora(models, {"unet.alpha_pattern": {REDOS_PATTERN: 4}}),
            "is not a plain module name; only module names are read",
        ),
        "pattern-not-a-regex": (peft_lora(models, {"unet.alpha_pattern": {"(": 4}}), "is not a plain module name"),
        "nan-tensor": (kohya_lora(models, nan_in_up), "holds NaN or infinite values, so the file is damaged"),
        "infinite-alpha-tensor": (kohya_lora(models, infinite_alpha), "holds NaN or infinite values"),
        "empty-alpha-tensor": (kohya_lora(models, empty_alpha), "is an empty tensor"),
        "infinite-alpha-number": (peft_lora(models, {"unet.lora_alpha": 1e400}), "alphas are finite numbers"),
        "huge-alpha-integer": (peft_lora(models, {"unet.lora_alpha": 10**400}), "is too large a number"),
        "huge-header-alpha": (peft_lora(models, header_changes={"alpha": "1e999"}), "alphas are finite numbers"),
        "deeply-nested-metadata": (
            peft_lora(models, header_changes={"lora_adapter_metadata": deep}),
            "is not valid JSON (or nests too deeply)",
        ),
        "metadata-not-an-object": (
            peft_lora(models, header_changes={"lora_adapter_metadata": "[1, 2]"}),
            "lora_adapter_metadata is not a JSON object",
        ),
        "alpha-pattern-a-list": (peft_lora(models, {"unet.alpha_pattern": [1, 2]}), "alpha_pattern is not a JSON"),
        "alpha-a-string": (peft_lora(models, {"unet.lora_alpha": "four"}), "lora_alpha is not a number"),
        "rslora-not-a-bool": (peft_lora(models, {"unet.use_rslora": "yes"}), "use_rslora is not true or false"),
        "huge-offsets": (
            raw_safetensors({"a.lora_down.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e400]}}),
            "not valid safetensors JSON",
        ),
        "120000-zero-size-tensors": (zero_size_tensors(120_000), "more than an SDXL LoRA's 30,000 tensors"),
        "16-mib-header": (zero_size_tensors(280_000), "more than the 8 MiB of a LoRA's"),
        "largest-header-allowed": (largest_header_allowed(), "none of its tensors fit an SDXL layer"),
    }
