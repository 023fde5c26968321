"""A request's LoRAs: fetched (or taken from the cache), read, and merged into the pipeline's weights, with the new
tokens they were trained with added to its tokenizers and text encoders.

Merged rather than run beside each layer: the cost is paid once per change of LoRAs or scales, never per step, and
a request that repeats the previous request's LoRAs and scales pays nothing but a cache lookup. Beside the layers,
every denoising step would run two extra small matmuls per adapted layer (docs/LORAS.md has the measurements).
"""

import logging
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from .. import memory
from ..errors import InputError, NotEnoughMemoryError
from ..inputs import LoraOptions
from ..pipeline import DifferentialDiffusionPipeline
from .cache import LoraCache
from .fetch import fetch_lora
from .formats import LoraContents
from .header import LoraError
from .summary import COMPONENT_NAMES, KIND_NAMES
from .tokens import read_tokens_file

log = logging.getLogger(__name__)


def file_identity(path: Path, cache: LoraCache) -> tuple:
    """What tells one LoRA file from another without reading it. A cache entry is written once (a new one is a new
    file: another inode) and its time is its recency; a local file may change in place, so its time counts."""
    stat = path.stat()
    identity = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size)
    return identity if path.resolve().parent == cache.folder.resolve() else (*identity, stat.st_mtime_ns)


def describe(name: str, contents: LoraContents, scale: float) -> str:
    updates = contents.updates
    components = Counter(COMPONENT_NAMES[update.component] for update in updates)
    kinds = Counter(KIND_NAMES[update.kind] for update in updates)
    dora = " with DoRA" if any(update.magnitude is not None for update in updates) else ""
    tokens = "".join(f"; trained tokens {entry.trigger!r} -> {''.join(entry.tokens)}" for entry in contents.token_sets)
    return (
        f"{name}: {len(updates)} parameters ({', '.join(f'{part} {count}' for part, count in components.items())}),"
        f" {'/'.join(kinds)}{dora}, scale {scale:g}{tokens}"
    )


def place_copies(pipeline: DifferentialDiffusionPipeline, name: str, needed: int, reserve: int) -> None:
    """Put the copies of the weights a LoRA changes where they fit: beside the weights, in host memory when the GPU
    would be left without room for the edit itself (reserve), or refuse on a CPU without the memory."""
    held = pipeline.loras.copied_bytes()  # freed before the new copies are made
    gib = 2**30
    if pipeline.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(pipeline.device)
        on_gpu = needed + reserve <= free + (held if pipeline.loras.copies_device is None else 0)
        pipeline.loras.copies_device = None if on_gpu else torch.device("cpu")
        if not on_gpu:
            shown = (name, needed / gib, free / gib)
            log.info("%s: keeping the %.1f GiB of weight copies in host memory (GPU: %.1f GiB free)", *shown)
        return
    available = memory.available_bytes()
    if available is not None and needed + reserve > (available + held) * memory.MEMORY_HEADROOM:
        raise NotEnoughMemoryError(
            f"{name}: merging it needs {needed / gib:.1f} GiB for copies of the weights it changes, and"
            f" {(available + held) / gib:.1f} GiB is free beside the edit's own memory; use a GPU or a LoRA on fewer"
            " layers"
        )


def use_loras(
    pipeline: DifferentialDiffusionPipeline,
    options: LoraOptions,
    cache: LoraCache,
    allow_paths: bool = False,
    reserve_bytes: int = 0,
) -> float:
    """Make the pipeline's weights the reference plus this request's LoRAs; returns the seconds it took.

    A scale of 0 is the same as no LoRA (nothing is merged). reserve_bytes is the memory the edit itself needs,
    which the weight copies must leave. Errors are one line naming the input.
    """
    started = time.perf_counter()
    fetched: list[tuple[str, Path, float]] = []
    for request in options.loras:
        path = fetch_lora(
            request.name,
            request.source,
            hf_token=options.hf_api_token,
            civitai_token=options.civitai_api_token,
            cache=cache,
            allow_paths=allow_paths,
            in_use=[path for _, path, _ in fetched],
        )
        if path is not None and request.scale != 0:
            fetched.append((request.name, path, request.scale))
    key = tuple((file_identity(path, cache), scale) for _, path, scale in fetched)
    if key == pipeline.loras.applied and key == pipeline.tokens.applied:
        if key:
            log.info("LoRAs as in the previous request: nothing to merge")
        return time.perf_counter() - started
    loras, token_sets = [], []
    for name, path, scale in fetched:
        try:
            contents = pipeline.loras.read(path)
            contents = replace(contents, token_sets=contents.token_sets + read_tokens_file(cache.tokens(path)))
        except LoraError as error:
            raise InputError(f"{name}: {error}") from None
        log.info("%s", describe(name, contents, scale))
        loras.append((contents.updates, scale))
        token_sets += contents.token_sets
    if loras:
        place_copies(pipeline, fetched[0][0], pipeline.loras.copy_bytes(loras), reserve_bytes)
    try:
        pipeline.loras.apply(key, loras)
        pipeline.tokens.apply(key, token_sets)
    except BaseException as error:
        pipeline.loras.restore()
        pipeline.tokens.restore()
        if isinstance(error, LoraError):
            raise InputError(f"{' and '.join(name for name, _, _ in fetched)}: {error}") from None
        raise
    seconds = time.perf_counter() - started
    if loras:
        copies = pipeline.loras.copied_bytes() / 2**20
        log.info("merged %d LoRA(s) in %.2fs; copies of the changed weights: %.0f MiB", len(loras), seconds, copies)
    else:
        log.info("LoRAs removed: the weights are the reference again (%.2fs)", seconds)
    return seconds
