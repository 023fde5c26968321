"""Memory: refuse work that cannot fit before starting it, and recover cleanly when it did not fit.

On a GPU an out-of-memory error is an ordinary exception: it is caught, caches are freed and the user gets
one line saying what to lower. On a CPU the kernel kills the process (or swaps for minutes) instead, so a
prediction is refused up front when its estimated peak exceeds the memory that is available.
"""

import gc
import logging
import traceback
from pathlib import Path

import torch

from .errors import NotEnoughMemoryError
from .pipeline import DifferentialDiffusionPipeline
from .sizing import WORKING_AREA, working_size

log = logging.getLogger(__name__)

VAE_ACTIVATION_COPIES = 6
"""Peak VAE-decode memory per output, in full-resolution tensors of the decoder's widest full-resolution layer.

Measured on CPU in fp32: 4-5 for SDXL's VAE (256 channels) and the tiny test VAE (8 channels); one more for margin.
The UNet works at 1/8 of the resolution and needs far less, the VAE encoder sees one picture only.
"""

INPUT_BYTES_PER_PIXEL = 32
INPUT_BYTES_PER_PIXEL_PER_OUTPUT = 24
"""Float copies at the input's own size (the picture, its map, the composite), measured with a 12 MP input."""

MAP_BYTES_PER_PIXEL = 28
"""Peak memory of decoding and fitting a map, per pixel of the map: measured 10 (gray), 12 (16-bit) and 24 (RGBA)."""

MEMORY_HEADROOM = 0.9
"""Share of the available memory a prediction may plan to use; the rest covers the estimate's error."""

OUT_OF_MEMORY_ERRORS = (torch.cuda.OutOfMemoryError, MemoryError)

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED_CGROUP = 2**60
"""cgroup v1 reports "no limit" as a number near 2**63."""


def estimate_peak_bytes(
    pipeline: DifferentialDiffusionPipeline,
    num_outputs: int,
    width: int,
    height: int,
    area: int = WORKING_AREA,
    map_pixels: int = 0,
) -> int:
    """Memory a prediction needs on top of the loaded model, from its working size, batch and the VAE's width, the
    input's size and the map's (decoded and fitted: the same host memory on any device)."""
    return device_bytes(pipeline, num_outputs, width, height, area) + host_bytes(num_outputs, width, height, map_pixels)


def device_bytes(pipeline: DifferentialDiffusionPipeline, num_outputs: int, width: int, height: int, area: int) -> int:
    """The edit's activations, the VAE decode's mostly, on the pipeline's device."""
    work_width, work_height = working_size(width, height, area)
    channels = max(pipeline.vae.config.block_out_channels[:2])
    element_bytes = torch.finfo(pipeline.dtype).bits // 8
    return work_width * work_height * channels * element_bytes * VAE_ACTIVATION_COPIES * num_outputs


def host_bytes(num_outputs: int, width: int, height: int, map_pixels: int) -> int:
    """Copies at the input's own size and the map's decode, in host memory whatever the device."""
    full_size = width * height * (INPUT_BYTES_PER_PIXEL + INPUT_BYTES_PER_PIXEL_PER_OUTPUT * num_outputs)
    return full_size + map_pixels * MAP_BYTES_PER_PIXEL


def _read_number(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat_field(path: Path, field: str) -> int:
    """The number after `field` in a "name value" file such as /proc/meminfo or memory.stat; 0 if absent."""
    try:
        rows = [line.split() for line in path.read_text().splitlines()]
    except OSError:
        return 0
    return next((int(row[1]) for row in rows if len(row) >= 2 and row[0] == field), 0)


def _cgroup_available_bytes() -> int | None:
    """What the container's cgroup (v2, else v1) still allows, not counting reclaimable page cache."""
    for limit_file, usage_file, inactive_field in (
        ("memory.max", "memory.current", "inactive_file"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "total_inactive_file"),
    ):
        limit = _read_number(CGROUP_ROOT / limit_file)
        usage = _read_number(CGROUP_ROOT / usage_file)
        if limit is not None and usage is not None and limit < UNLIMITED_CGROUP:
            stat_file = CGROUP_ROOT / Path(limit_file).parent / "memory.stat"
            return max(0, limit - usage + _stat_field(stat_file, inactive_field))
    return None


def available_bytes() -> int | None:
    """Memory this process can still use: the kernel's MemAvailable capped by the container's cgroup limit.

    None where the kernel does not say (not Linux): then nothing is refused.
    """
    available_kib = _stat_field(Path("/proc/meminfo"), "MemAvailable:")
    if not available_kib:
        return None
    cgroup = _cgroup_available_bytes()
    return available_kib * 1024 if cgroup is None else min(available_kib * 1024, cgroup)


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def check_fits(
    pipeline: DifferentialDiffusionPipeline,
    num_outputs: int,
    width: int,
    height: int,
    area: int = WORKING_AREA,
    map_pixels: int = 0,
) -> None:
    """Refuse, before starting, a prediction whose estimated peak does not fit in available host memory: all of it
    on a CPU; on a GPU, what it decodes at the input's and the map's size (a GPU's shortage is caught as it comes)."""
    needed = host_bytes(num_outputs, width, height, map_pixels)
    if pipeline.device.type == "cpu":
        needed += device_bytes(pipeline, num_outputs, width, height, area)
    available = available_bytes()
    if available is not None and needed > available * MEMORY_HEADROOM:
        raise NotEnoughMemoryError(
            f"num_outputs: {num_outputs} output(s) of a {width}x{height} image need about {_gib(needed)} of memory"
            f" and {_gib(available)} is free; lower num_outputs or send a smaller image (or map)"
        )


def out_of_memory_error(num_outputs: int, width: int, height: int) -> NotEnoughMemoryError:
    return NotEnoughMemoryError(
        f"num_outputs: out of memory making {num_outputs} output(s) of a {width}x{height} image;"
        " lower num_outputs or send a smaller image"
    )


def release(error: BaseException) -> None:
    """Free what a failed or cancelled prediction held: its frames' tensors, cycles and PyTorch's CUDA cache.

    A live traceback keeps every local of the failed frames (latents, decoded pictures) alive, so its frames
    are cleared first; otherwise emptying the cache would free nothing.
    """
    traceback.clear_frames(error.__traceback__)
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
