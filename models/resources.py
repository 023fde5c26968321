"""Memory: refuse work that cannot fit before starting it, and recover cleanly when it did not fit.

On a GPU an out-of-memory error is an ordinary exception: it is caught, caches are freed and the user gets
one line saying what to lower. On a CPU the kernel kills the process (or swaps for minutes) instead, so a
prediction is refused up front when its estimated peak exceeds the memory that is available.
"""

import ctypes
import gc
import logging
import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

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

MEMORY_HEADROOM = 0.9
"""Share of the available memory a prediction may plan to use; the rest covers the estimate's error."""

OUT_OF_MEMORY_ERRORS = (torch.cuda.OutOfMemoryError, MemoryError)

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED_CGROUP = 2**60
"""cgroup v1 reports "no limit" as a number near 2**63."""


class NotEnoughMemoryError(RuntimeError):
    """A request needs more memory than there is; the message names what to lower."""


def estimate_peak_bytes(
    pipeline: DifferentialDiffusionPipeline, num_outputs: int, width: int, height: int, area: int = WORKING_AREA
) -> int:
    """Memory a prediction needs on top of the loaded model, from its working size, batch and the VAE's width."""
    work_width, work_height = working_size(width, height, area)
    channels = max(pipeline.vae.config.block_out_channels[:2])
    element_bytes = torch.finfo(pipeline.dtype).bits // 8
    decode = work_width * work_height * channels * element_bytes * VAE_ACTIVATION_COPIES * num_outputs
    full_size = width * height * (INPUT_BYTES_PER_PIXEL + INPUT_BYTES_PER_PIXEL_PER_OUTPUT * num_outputs)
    return decode + full_size


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


def available_memory_bytes() -> int | None:
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


def check_memory(
    pipeline: DifferentialDiffusionPipeline, num_outputs: int, width: int, height: int, area: int = WORKING_AREA
) -> None:
    """On CPU, refuse before starting a prediction whose estimated peak does not fit in available memory."""
    if pipeline.device.type != "cpu":
        return
    needed = estimate_peak_bytes(pipeline, num_outputs, width, height, area)
    available = available_memory_bytes()
    if available is not None and needed > available * MEMORY_HEADROOM:
        raise NotEnoughMemoryError(
            f"num_outputs: {num_outputs} output(s) of a {width}x{height} image need about {_gib(needed)} of memory"
            f" and {_gib(available)} is free; lower num_outputs or send a smaller image"
        )


def out_of_memory_error(num_outputs: int, width: int, height: int) -> NotEnoughMemoryError:
    return NotEnoughMemoryError(
        f"num_outputs: out of memory making {num_outputs} output(s) of a {width}x{height} image;"
        " lower num_outputs or send a smaller image"
    )


def release_memory(error: BaseException) -> None:
    """Free what a failed or cancelled prediction held: its frames' tensors, cycles and PyTorch's CUDA cache.

    A live traceback keeps every local of the failed frames (latents, decoded pictures) alive, so its frames
    are cleared first; otherwise emptying the cache would free nothing.
    """
    traceback.clear_frames(error.__traceback__)
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


M_TRIM_THRESHOLD, M_MMAP_MAX, M_MMAP_THRESHOLD = -1, -4, -3
"""mallopt() parameter numbers, from glibc's malloc.h."""

GLIBC_TRIM_THRESHOLD, GLIBC_MMAP_MAX = 128 << 10, 65536
"""glibc's initial values of those two."""


@dataclass(frozen=True)
class HeapPolicy:
    """mallopt() settings as {name: (parameter, value)}: `settings` applied once in setup, `during_edit` for the span
    of each edit (heap_for_edit) and then set back to `after_edit`."""

    settings: dict[str, tuple[int, int]]
    during_edit: dict[str, tuple[int, int]] = field(default_factory=dict)
    after_edit: dict[str, tuple[int, int]] = field(default_factory=dict)


MMAP_32MIB = {"M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, 32 << 20)}
HEAP_ONLY = {"M_MMAP_MAX": (M_MMAP_MAX, 0), "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, 1 << 30)}
BETWEEN_EDITS = {
    "M_MMAP_MAX": (M_MMAP_MAX, GLIBC_MMAP_MAX),
    "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD),
}
"""HEAP_ONLY's two parameters at glibc's initial values: set in setup too, so that an edit ends on exactly the settings
it began with (glibc raises its trim threshold by itself until a threshold is set)."""

HEAP_POLICIES: dict[str, HeapPolicy] = {
    "edit-in-heap": HeapPolicy({**MMAP_32MIB, **BETWEEN_EDITS}, during_edit=HEAP_ONLY, after_edit=BETWEEN_EDITS),
    "mmap-32mib": HeapPolicy(MMAP_32MIB),
    "no-mmap": HeapPolicy(HEAP_ONLY),
    "mmap-1mib": HeapPolicy({"M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, 1 << 20)}),
    "glibc": HeapPolicy({}),
}
"""glibc mallopt() settings that setup can apply; HEAP_POLICY picks one.

Every large tensor that gets a mapping of its own is fresh memory that the kernel faults in and zeroes, and is
returned to the system when freed; a block carved from the heap reuses pages, and trim_heap() hands the free ones back
at the end of each prediction.
edit-in-heap: mmap-32mib, but while an edit runs every block from the heap and nothing trimmed on free(), so that each
large activation reuses the pages of those freed before it; trim_heap() hands them back after the prediction.
mmap-32mib: blocks from 32 MiB up (glibc's largest threshold) in mappings of their own, the rest from the heap.
no-mmap: every block from the heap, and no trimming of its top on free() below 1 GiB, at all times: fast (0.93-0.98x
of plain diffusers through Cog's server), but the heap fragments when the working size changes between predictions
(the worker's RSS grew 11-90 MiB over the soak, past its 32 MiB bound in 3 of 6 runs).
mmap-1mib: blocks from 1 MiB up in mappings of their own (the policy before mmap-32mib).
glibc: glibc's defaults (a threshold that rises with the largest block freed); the choice when another allocator is
preloaded, where mallopt() does nothing.
"""

DEFAULT_HEAP_POLICY = "edit-in-heap"
"""Through Cog's server at 0.84-1.00x of plain diffusers against mmap-32mib's 0.98-1.06x in the same five runs, and the
soak's memory bound holds (docs/BENCHMARKS.md, "Through Cog's server, and the heap policy")."""


def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_edit_policy = HeapPolicy({})
"""The policy configure_heap() applied, for heap_for_edit()."""


def configure_heap(policy: str | None = None) -> str:
    """Apply a policy of HEAP_POLICIES (default: $HEAP_POLICY, else DEFAULT_HEAP_POLICY) and return its name.

    Nothing is applied on other C libraries; a setting glibc refuses is logged and skipped.
    """
    global _edit_policy
    policy = policy or os.environ.get("HEAP_POLICY") or DEFAULT_HEAP_POLICY
    if policy not in HEAP_POLICIES:
        raise ValueError(f"HEAP_POLICY: {policy!r} is not one of {', '.join(HEAP_POLICIES)}")
    _apply(HEAP_POLICIES[policy].settings)
    _edit_policy = HEAP_POLICIES[policy]
    return policy


def _apply(settings: dict[str, tuple[int, int]]) -> None:
    libc = _glibc()
    if libc is None:
        return
    for name, (parameter, value) in settings.items():
        if libc.mallopt(parameter, value) != 1:
            log.warning("heap: glibc refused %s=%d", name, value)


@contextmanager
def heap_for_edit() -> Iterator[None]:
    """The configured policy's settings for the span of one edit, set back after it however it ends."""
    _apply(_edit_policy.during_edit)
    try:
        yield
    finally:
        _apply(_edit_policy.after_edit)


def trim_heap() -> None:
    """Hand the heap's free pages back to the system at the end of a prediction (nothing to do on other C libraries).

    Called once per prediction, after its outputs are written, so that the encoders' buffers go too.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
