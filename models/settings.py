"""Every environment variable the package reads: its name, default and meaning, and one parser per kind of value.

Values are read when asked for, not at import, so a test or a tool that sets a variable sees its effect. A value a
variable cannot take is a SettingError naming the variable and what it allows.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import SettingError
from .limits import LORA_CACHE_MAX_BYTES, LORA_CACHE_MIN_FREE_BYTES, MAX_LORA_DOWNLOAD_S

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    meaning: str

    def text(self) -> str:
        """The variable's value, stripped; its default when unset or empty."""
        return os.environ.get(self.name, "").strip() or self.default


MODEL_CACHE = Setting("MODEL_CACHE", "model-cache", "the weights folder")
VERIFY_WEIGHTS = Setting("VERIFY_WEIGHTS", "0", "1: setup hashes every weight file against the manifest (~4 s)")
WEIGHTS_SNAPSHOTS = Setting("WEIGHTS_SNAPSHOTS", "", "a folder of <owner>/<name>/ repositories to build from offline")
HF_HUB_OFFLINE = Setting("HF_HUB_OFFLINE", "0", "1: huggingface_hub uses no network (builds only from snapshots)")
COMPILE = Setting("COMPILE", "0", "1: compile the UNet and VAE decoder in setup, warmed up at 1024x1024")
LOW_VRAM = Setting("LOW_VRAM", "0", "1: the low-memory mode (model offload, VAE tiling) for 8-12 GB GPUs")
HEAP_POLICY = Setting("HEAP_POLICY", "edit-in-heap", "glibc's malloc settings for the worker (models/heap.py)")
LORA_CACHE = Setting("LORA_CACHE", "", "the folder of fetched LoRAs (default: <MODEL_CACHE>.loras)")
LORA_CACHE_MAX = Setting("LORA_CACHE_MAX_BYTES", str(LORA_CACHE_MAX_BYTES), "the LoRA cache's size before eviction")
LORA_CACHE_MIN_FREE = Setting(
    "LORA_CACHE_MIN_FREE_BYTES", str(LORA_CACHE_MIN_FREE_BYTES), "free disk space the LoRA cache keeps by evicting"
)
LORA_DOWNLOAD_TIMEOUT = Setting(
    "LORA_DOWNLOAD_TIMEOUT", f"{MAX_LORA_DOWNLOAD_S:g}", "seconds a LoRA download may take in all (redirects included)"
)
ALLOW_PRIVATE_LORA_HOSTS = Setting("ALLOW_PRIVATE_LORA_HOSTS", "0", "1: fetch LoRAs from private addresses too")
HF_ENDPOINT = Setting("HF_ENDPOINT", "https://huggingface.co", "the Hugging Face Hub's address")
ACCELERATOR = Setting(
    "ACCELERATOR", "", "flash, lightning or tcd: the few-step LoRA to fuse, among those the weights folder holds"
)

SETTINGS = (
    MODEL_CACHE, VERIFY_WEIGHTS, WEIGHTS_SNAPSHOTS, HF_HUB_OFFLINE, COMPILE, LOW_VRAM, HEAP_POLICY, LORA_CACHE,
    LORA_CACHE_MAX, LORA_CACHE_MIN_FREE, LORA_DOWNLOAD_TIMEOUT, ALLOW_PRIVATE_LORA_HOSTS, HF_ENDPOINT, ACCELERATOR,
)  # fmt: skip


def enabled(setting: Setting) -> bool:
    """A switch: 1, true, yes or on (any case) are on; unset, empty, 0, false, no and off are off."""
    value = setting.text().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise SettingError(f"{setting.name}: must be 1 or 0 (or true/false, yes/no, on/off), got {value!r}")


def byte_count(setting: Setting) -> int:
    value = setting.text()
    if not value.isdigit():
        raise SettingError(f"{setting.name}: must be a whole number of bytes, got {value!r}")
    return int(value)


def seconds(setting: Setting) -> float:
    try:
        value = float(setting.text())
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise SettingError(f"{setting.name}: must be a positive number of seconds, got {setting.text()!r}")
    return value


def folder(setting: Setting) -> Path | None:
    """A path setting; None when unset and without a default."""
    value = setting.text()
    return Path(value) if value else None


def model_cache() -> Path:
    """The weights folder: $MODEL_CACHE, else ./model-cache."""
    return Path(MODEL_CACHE.text())


def hf_endpoint() -> str:
    return HF_ENDPOINT.text().rstrip("/")
