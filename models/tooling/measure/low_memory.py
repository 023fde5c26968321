"""The low-memory mode on an emulated small GPU: a one-megapixel edit's time and peak GPU memory.

On a GPU the process is capped at memory_gib with torch.cuda.set_per_process_memory_fraction (an 8 GB card on a
larger one), the pipeline loads in the low-memory mode (model offload, VAE tiling), and each edit's peak allocated
memory is read from PyTorch's allocator. On a CPU only the tiling path runs (offload needs an accelerator).
"""

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...editor import edit_files
from ...inputs import EditOptions
from ...weights.load import load_pipeline, select_device
from .table import Table


def measure_low_memory(weights: Path, memory_gib: float = 8.0, repeats: int = 2) -> Table:
    device, dtype = select_device()
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_gib * 2**30 / total), device)
    started = time.perf_counter()
    pipeline = load_pipeline(weights, device, dtype, low_vram=True)
    setup = time.perf_counter() - started
    rng = np.random.default_rng(0)
    options = EditOptions.from_values({"prompt": "a red boat", "seed": 1})
    times, peaks = [], []
    with tempfile.TemporaryDirectory() as scratch:
        image, mask = Path(scratch) / "photo.png", Path(scratch) / "map.png"
        Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)).save(image)
        Image.fromarray(np.full((1024, 1024), 255, np.uint8)).save(mask)
        for _ in range(repeats + 1):  # the first is a warm-up
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            began = time.perf_counter()
            edit_files(pipeline, image, mask, options)
            times.append(time.perf_counter() - began)
            peaks.append(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0)
    table = Table(f"{weights} on {device} ({str(pipeline.dtype).removeprefix('torch.')})")
    cap = f"{memory_gib:g} GiB cap" if device.type == "cuda" else "no GPU: tiling only"
    table.add("mode", f"low-memory ({cap}): offload {'on' if pipeline.offload_hooks else 'off'}, VAE tiling on")
    table.add("setup (load_pipeline)", f"{setup:.2f} s", setup_s=setup)
    median = statistics.median(times[1:])
    table.add("1024x1024 edit, 4 steps", f"median {median:.3f} s (first {times[0]:.3f} s)", edit_s=times)
    if device.type == "cuda":
        table.add("peak GPU memory allocated", f"{max(peaks) / 2**30:.2f} GiB", peak_bytes=max(peaks))
    return table


def add_arguments(parser) -> None:
    parser.add_argument("--memory-gib", type=float, default=8.0, help="the GPU memory to emulate")
    parser.add_argument("--repeats", type=int, default=2)


def run(args) -> Table:
    return measure_low_memory(args.weights, args.memory_gib, args.repeats)
