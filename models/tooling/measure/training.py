"""What training costs: seconds per step at one resolution for each batch size, peak GPU memory, one sample picture,
and the time a default training would take, on a weights folder (full-size random weights on a lent GPU)."""

import gc
import statistics
import time
from pathlib import Path

import torch

from ...training.inputs import TRAINING_INPUTS, TrainingOptions
from ...training.photos import Example
from ...training.run import training_device
from ...training.trainer import Training
from ...weights.load import load_base_models
from ..pictures import photo
from .table import Table


def step_seconds(weights: Path, resolution: int, batch: int, steps: int, warmup: int) -> dict[str, float]:
    """One short training of square photos on freshly loaded base models: its steps' seconds after the warm-up, the
    final sample's, and the peak memory (the whole run's, on a GPU)."""
    device, dtype = training_device("auto")
    started = time.perf_counter()
    components, _ = load_base_models(weights, device, dtype, build_missing=False)
    load_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    weights_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    options = TrainingOptions.from_values({"resolution": resolution, "batch_size": batch, "steps": warmup + steps,
                                           "seed": 0, "sample_every": 0})  # fmt: skip
    examples = [Example(f"photo-{index}", photo(resolution, resolution, seed=index), "a photo of TOK",
                        (resolution, resolution), (0, 0)) for index in range(batch)]  # fmt: skip
    training = Training(components, options, examples, device, dtype)
    training.encode_latents()
    marks: list[float] = []

    def on_step(step: int, total: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())

    trained = training.run(on_step)
    figures = {
        "load_s": load_s,
        "step_s": [after - before for before, after in zip(marks[warmup - 1 :], marks[warmup:], strict=False)],
        "sample_s": trained.progress.seconds.get("samples", 0.0),
        "weights_gib": weights_bytes / 2**30,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    del training, trained, components
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return figures


def measure_training(weights: Path, resolution: int = 1024, batches: str = "1,4", steps: int = 5, warmup: int = 2
                     ) -> Table:  # fmt: skip
    """batches: the batch sizes, separated by commas (as the flag takes them)."""
    device, dtype = training_device("auto")
    table = Table(f"{weights}, square photos at {resolution}, on {device} ({str(dtype).removeprefix('torch.')})")
    per_step = {}
    for batch in (int(size) for size in batches.split(",")):
        figures = step_seconds(weights, resolution, batch, steps, warmup)
        median = statistics.median(figures["step_s"])
        per_step[batch] = median
        peak = (
            f", peak {figures['peak_gib']:.1f} GiB (weights {figures['weights_gib']:.1f})"
            if figures["peak_gib"]
            else ""
        )
        table.add(f"batch {batch}", f"{median:.3f} s a step ({batch / median:.2f} photos/s){peak}",
                  **{f"batch_{batch}": figures})  # fmt: skip
    sample_s = figures["sample_s"]
    table.add("a sample (25 steps, guidance 5)", f"{sample_s:.1f} s", sample_s=sample_s)
    default_steps, every = TRAINING_INPUTS["steps"].default, TRAINING_INPUTS["sample_every"].default
    if 1 in per_step:
        samples = default_steps // every + (default_steps % every != 0)
        estimate = default_steps * per_step[1] + samples * sample_s + figures["load_s"]
        table.add(f"a default training ({default_steps} steps, batch 1, {samples} samples, loading)",
                  f"{estimate / 60:.1f} min", default_training_s=estimate)  # fmt: skip
    return table


def add_arguments(parser) -> None:
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batches", default="1,4", help="batch sizes, separated by commas")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per batch size, after 2 of warm-up")


def run(args) -> Table:
    return measure_training(args.weights, args.resolution, args.batches, args.steps)
