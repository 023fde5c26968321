"""The safety checker's cost per request: one run on the batch of outputs (and crops), as the editor calls it; for
batches of 1 and 4 pictures of 1024x1024, and for one 4000x3000 output with its 1000x1000 crop."""

import statistics
from pathlib import Path

import numpy as np

from ...weights.load import load_pipeline
from ..measuring import synchronised_seconds
from .table import Table


def measure_safety(weights: Path, repeats: int = 5) -> Table:
    pipeline = load_pipeline(weights)
    rng = np.random.default_rng(0)
    cases = {
        "1 output, 1024x1024": [rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)],
        "4 outputs, 1024x1024": [rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8) for _ in range(4)],
        "1 output 4000x3000 + its 1000x1000 crop": [
            rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8),
            rng.integers(0, 256, (1000, 1000, 3), dtype=np.uint8),
        ],
    }
    table = Table(f"{weights} on {pipeline.device} ({str(pipeline.dtype).removeprefix('torch.')})")
    for label, pictures in cases.items():
        pipeline.safety.flags(pictures)  # warm-up
        times = [
            synchronised_seconds(lambda pictures=pictures: pipeline.safety.flags(pictures)) for _ in range(repeats)
        ]
        runs = ", ".join(f"{seconds * 1000:.0f}" for seconds in times)
        table.add(label, f"median {statistics.median(times) * 1000:.0f} ms ({runs})", **{label: times})
    return table


def add_arguments(parser) -> None:
    parser.add_argument("--repeats", type=int, default=5)


def run(args) -> Table:
    return measure_safety(args.weights, args.repeats)
