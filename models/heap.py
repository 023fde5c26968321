"""The worker's heap policy: glibc malloc settings that decide whether large tensors reuse heap pages.

Every large tensor that gets a mapping of its own is fresh memory that the kernel faults in and zeroes, and is
returned to the system when freed; a block carved from the heap reuses pages, and trim() hands the free ones back at
the end of each prediction. Which policy is fastest, and what each costs in the soak's memory, is measured side by
side by `scripts/measure heap` (docs/BENCHMARKS.md, "Through Cog's server, and the heap policy").
"""

import ctypes
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from . import settings
from .errors import SettingError

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_MAX, M_MMAP_THRESHOLD = -1, -4, -3
"""mallopt() parameter numbers, from glibc's malloc.h."""

GLIBC_TRIM_THRESHOLD, GLIBC_MMAP_MAX = 128 << 10, 65536
"""glibc's initial values of those two."""

Settings = dict[str, tuple[int, int]]
"""mallopt() settings as {name: (parameter, value)}."""


@dataclass(frozen=True)
class HeapPolicy:
    """`settings` applied once in setup, `during_edit` for the span of each edit (for_edit) and then set back to
    `after_edit`."""

    settings: Settings
    during_edit: Settings = field(default_factory=dict)
    after_edit: Settings = field(default_factory=dict)


MMAP_32MIB = {"M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, 32 << 20)}
HEAP_ONLY = {"M_MMAP_MAX": (M_MMAP_MAX, 0), "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, 1 << 30)}
BETWEEN_EDITS = {
    "M_MMAP_MAX": (M_MMAP_MAX, GLIBC_MMAP_MAX),
    "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD),
}
"""HEAP_ONLY's two parameters at glibc's initial values: set in setup too, so that an edit ends on exactly the settings
it began with (glibc raises its trim threshold by itself until a threshold is set)."""

POLICIES: dict[str, HeapPolicy] = {
    "edit-in-heap": HeapPolicy({**MMAP_32MIB, **BETWEEN_EDITS}, during_edit=HEAP_ONLY, after_edit=BETWEEN_EDITS),
    "mmap-32mib": HeapPolicy(MMAP_32MIB),
    "no-mmap": HeapPolicy(HEAP_ONLY),
    "mmap-1mib": HeapPolicy({"M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, 1 << 20)}),
    "glibc": HeapPolicy({}),
}
"""The policies setup can apply; $HEAP_POLICY picks one.

edit-in-heap (the default): mmap-32mib, but while an edit runs every block comes from the heap and nothing is trimmed
on free(), so that each large activation reuses the pages of those freed before it; trim() hands them back after the
prediction.
mmap-32mib: blocks from 32 MiB up (glibc's largest threshold) in mappings of their own, the rest from the heap.
no-mmap: every block from the heap, and no trimming of its top on free() below 1 GiB, at all times; the heap fragments
when the working size changes between predictions, so the soak's memory grows.
mmap-1mib: blocks from 1 MiB up in mappings of their own (the first policy).
glibc: glibc's defaults (a threshold that rises with the largest block freed); the choice when another allocator is
preloaded, where mallopt() does nothing.
"""

DEFAULT_POLICY = settings.HEAP_POLICY.default


def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_configured = HeapPolicy({})
"""The policy configure() applied, for for_edit()."""


def configure(policy: str | None = None) -> str:
    """Apply a policy of POLICIES (default: $HEAP_POLICY) and return its name.

    Nothing is applied on other C libraries; a setting glibc refuses is logged and skipped.
    """
    global _configured
    policy = policy or settings.HEAP_POLICY.text()
    if policy not in POLICIES:
        raise SettingError(f"HEAP_POLICY: {policy!r} is not one of {', '.join(POLICIES)}")
    _apply(POLICIES[policy].settings)
    _configured = POLICIES[policy]
    return policy


def _apply(values: Settings) -> None:
    libc = _glibc()
    if libc is None:
        return
    for name, (parameter, value) in values.items():
        if libc.mallopt(parameter, value) != 1:
            log.warning("heap: glibc refused %s=%d", name, value)


@contextmanager
def for_edit() -> Iterator[None]:
    """The configured policy's settings for the span of one edit, set back after it however it ends."""
    _apply(_configured.during_edit)
    try:
        yield
    finally:
        _apply(_configured.after_edit)


def trim() -> None:
    """Hand the heap's free pages back to the system at the end of a prediction (nothing to do on other C libraries).

    Called once per prediction, after its outputs are written, so that the encoders' buffers go too.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
