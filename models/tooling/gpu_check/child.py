"""The GPU check's child tasks, each in a fresh process after the install stage put the carried wheels on its
PYTHONPATH: `python -m models.tooling.gpu_check.child TASK PARAMS_JSON RESULT_PATH`.

A task calls the package's and the tooling's functions and writes its figures to RESULT_PATH as JSON after every
step, so that a child stopped at its deadline leaves what it measured. Nothing here patches the library: the hooks a
measurement needs (setup timings, the compiler) are arguments and records of the library itself.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..files import write_atomically
from ..gpu_wheels import normalised


class Progress:
    """A child's figures, written to its result file after every step, so that a stopped child leaves them."""

    def __init__(self, path: Path):
        self.path = path
        self.figures: dict[str, Any] = {}

    def update(self, **figures: Any) -> None:
        self.figures.update(figures)
        write_atomically(self.path, json.dumps(self.figures, indent=2, default=str))


def versions_task(params: dict[str, Any], progress: Progress) -> None:
    """Versions of every installed package (the first of each name on sys.path, as imports see them), what torch
    sees of the GPU, and whether the stages' imports work; with carried wheels, whether their requirements are met."""
    import importlib.metadata

    packages: dict[str, str] = {}
    for distribution in importlib.metadata.distributions():
        packages.setdefault(normalised(distribution.metadata["Name"] or ""), distribution.version)
    errors = {}
    for module in params["imports"]:
        try:
            importlib.import_module(module)
        except Exception as error:  # recorded: the report says which import broke and how
            errors[module] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    import torch

    figures: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "packages": packages,
        "import_errors": errors,
        "unmet_requirements": unmet_requirements(params.get("carried", []), packages),
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        figures.update(
            device_name=properties.name,
            capability=f"{properties.major}.{properties.minor}",
            multiprocessors=properties.multi_processor_count,
            device_memory_gib=properties.total_memory / 2**30,
        )
    progress.update(**figures)


def unmet_requirements(carried: list[str], packages: dict[str, str]) -> list[str]:
    """The carried packages' own requirements (extras left out) that the installed versions do not meet."""
    import importlib.metadata

    from packaging.requirements import Requirement

    unmet = []
    for name in carried:
        for text in importlib.metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            installed = packages.get(normalised(requirement.name))
            if installed is None or not requirement.specifier.contains(installed, prereleases=True):
                unmet.append(f"{name} needs {requirement.name}{requirement.specifier}, found {installed or 'none'}")
    return unmet


def weights_task(params: dict[str, Any], progress: Progress) -> None:
    """Random weights of the plan's size, filled on the plan's device."""
    import torch

    from ..random_weights.build import write_test_weights

    folder, device = Path(params["folder"]), torch.device(params["device"])
    total = write_test_weights(folder, params["size"], 0, device, params["accelerator"])
    progress.update(bytes=total)


class OutcomeRecorder:
    """A pytest plugin recording each test's outcome, and why it failed or was skipped, as pytest reports them."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tests: dict[str, dict[str, str]] = {}

    def pytest_runtest_logreport(self, report) -> None:
        name = report.nodeid.split("::", 1)[1]
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.tests[name] = {"outcome": "SKIPPED", "note": reason.removeprefix("Skipped: ")}
        elif report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            outcome = "FAILED" if report.when == "call" else "ERROR"
            self.tests[name] = {"outcome": outcome, "note": crash.message if crash else str(report.longrepr)[:300]}
        elif report.when == "call":
            self.tests[name] = {"outcome": "PASSED"}
        self.progress.update(tests=self.tests)


def cuda_tests_task(params: dict[str, Any], progress: Progress) -> None:
    """pytest on the tests marked `cuda`, on the given weights; the figures they record are read back after."""
    import os

    import pytest

    record = Path(progress.path).with_suffix(".figures.jsonl")
    record.unlink(missing_ok=True)
    os.environ["GPU_CHECK_WEIGHTS"], os.environ["GPU_CHECK_RECORD"] = params["weights"], str(record)
    outcomes = OutcomeRecorder(progress)
    code = pytest.main([params["tests"], "-m", "cuda", "-q", "-p", "no:cacheprovider"], plugins=[outcomes])
    figures = [json.loads(line) for line in record.read_text().splitlines() if line.strip()] if record.exists() else []
    progress.update(tests=outcomes.tests, figures={row.pop("test"): row for row in figures}, exit_code=int(code))


def benchmark_task(params: dict[str, Any], progress: Progress) -> None:
    """The benchmark's pipelines loaded once, then one grid point at a time, the tables rewritten after each."""
    from ..benchmark.report import point_summary
    from ..benchmark.run import Benchmark, Options, parse_size, write_report

    out, scratch = Path(params["out"]), Path(params["scratch"])
    scratch.mkdir(parents=True, exist_ok=True)
    options = Options(warmup=params["warmup"], repeats=params["repeats"])
    benchmark = Benchmark(Path(params["weights"]), options, scratch)
    rows, points = [], []
    for size, batch in params["points"]:
        rows.append(benchmark.point(*parse_size(size), batch))
        report = benchmark.report(rows, params["weights_kind"])
        report["meta"] |= {"commit": params["commit"], "command": f"gpu-check benchmark, {len(rows)} point(s)"}
        write_report(report, out)
        points = [point_summary(row) for row in report["results"]]
        progress.update(points=points, setup_s=benchmark.setup_s, matmul_tflops=report["meta"]["matmul_tflops"])


def compile_task(params: dict[str, Any], progress: Progress) -> None:
    """One COMPILE=1 boot: setup, then compile-and-warm-up timed on its own, then edits at the serving shape (side x
    side, batch 1), compiled alone and (against_eager) interleaved with the same pipeline's eager modules, which the
    compiled ones wrap (same weights, so no second copy to load). Without `compiles` nothing is compiled (the dry
    run): the compiler passed is the identity."""
    from ...acceleration import compile_and_warm_up, whole_graph_compile
    from ...editor import edit_files
    from ...inputs import EditOptions
    from ...weights.load import compile_cache, load_pipeline
    from ..benchmark.report import pair_summary
    from ..benchmark.run import make_inputs
    from ..measuring import interleaved

    booted = time.perf_counter()
    pipeline = load_pipeline(Path(params["weights"]))
    eager = pipeline.unet, pipeline.vae.decoder
    progress.update(compiling_from_s=time.perf_counter() - booted)  # a boot stopped while compiling says when it began
    started = time.perf_counter()
    compiler = whole_graph_compile if params["compiles"] else (lambda module: module)
    compile_and_warm_up(pipeline, compile_cache(Path(params["weights"])), compiler, params["side"])
    progress.update(compile_and_warm_up_s=time.perf_counter() - started, setup_s=time.perf_counter() - booted)
    modules = {"eager": eager, "compiled": (pipeline.unet, pipeline.vae.decoder)}
    side = params["side"]
    scratch = Path(params["scratch"])
    scratch.mkdir(parents=True, exist_ok=True)
    image_path, map_path = make_inputs(scratch, side, side)
    options = EditOptions.from_values({"prompt": "a dramatic sunset sky with pink clouds", "seed": 1234})

    def edit_with(name: str) -> Callable[[], None]:
        def run() -> None:
            pipeline.unet, pipeline.vae.decoder = modules[name]
            edit_files(pipeline, image_path, map_path, options, working_area=side * side)

        return run

    runs = {"compiled": edit_with("compiled")}
    progress.update(**interleaved(runs, params["warmup"], params["repeats"]))
    if not params["against_eager"]:
        return
    runs["eager"] = edit_with("eager")
    measured = interleaved(runs, params["warmup"], params["repeats"])
    pairs = [e / c for c, e in zip(measured["compiled"]["runs_s"], measured["eager"]["runs_s"], strict=True)]
    speedup = measured["eager"]["median_s"] / measured["compiled"]["median_s"]
    progress.update(**measured, speedup=speedup, pairs=pair_summary(pairs))


def measure_task(params: dict[str, Any], progress: Progress) -> None:
    """One measurement of `scripts/measure` on the given weights, its table as JSON."""
    from ..measure.loras import measure_loras
    from ..measure.low_memory import measure_low_memory
    from ..measure.maps import measure_maps
    from ..measure.safety import measure_safety
    from ..measure.training import measure_training

    measurements = {
        "training": measure_training,
        "loras": measure_loras,
        "safety": measure_safety,
        "maps": measure_maps,
        "low-memory": measure_low_memory,
    }
    what, weights = params.pop("what"), Path(params.pop("weights"))
    progress.update(**measurements[what](weights, **params).to_json())


TASKS: dict[str, Callable[[dict[str, Any], Progress], None]] = {
    "versions": versions_task,
    "weights": weights_task,
    "cuda-tests": cuda_tests_task,
    "benchmark": benchmark_task,
    "compile": compile_task,
    "measure": measure_task,
}


def main(argv: list[str]) -> int:
    task, params, result = argv
    TASKS[task](json.loads(params), Progress(Path(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
