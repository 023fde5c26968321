"""The stages of the GPU check, in the order a first GPU most needs them answered: the machine, the carried wheels,
full-size random weights, the tests marked `cuda`, the benchmark against plain diffusers, COMPILE=1, then the
measurements of other features (user LoRAs, the safety checker, the low-memory mode on an emulated 8 GB card).

Each stage's work that imports the model stack runs in a child process (models/tooling/gpu_check/child.py), after the
install stage has put the carried wheels on its PYTHONPATH; its figures come back as JSON.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..gpu_wheels import pinned_versions, wheel_name_and_version
from .plan import CUDA_TESTS, IMPORTS, PACKAGES, SECOND_BOOT_MIN_S, Plan
from .report import (
    describe_benchmark,
    describe_compile,
    describe_environment,
    describe_install,
    describe_measurement,
    describe_tests,
    describe_weights,
)
from .runner import Check, Outcome, Stage, ended, run_child, run_command


def environment(check: Check, deadline: float) -> Outcome:
    """The machine as found: GPU, driver, CPUs, memory, disk, and every package's version before the install."""
    finished, versions = run_child(check, "versions", {"imports": ["torch"]}, deadline)
    result = {
        "gpu": nvidia_smi(),
        "cpus": os.cpu_count(),
        "memory_gib": meminfo_gib(),
        "disk_free_gib": shutil.disk_usage(check.work).free / 2**30,
        "platform": platform.platform(),
        "found": versions,
    }
    outcome = ended(finished, result)
    if outcome.status == "passed" and not check.dry_run and not versions.get("cuda_available"):
        return Outcome("failed", "no CUDA device: on a CPU, run with --dry-run", result)
    return outcome


def nvidia_smi() -> dict[str, str] | None:
    """The GPU as its driver reports it (name, driver, memory, clocks, power limit, state); None without one."""
    fields = ("name", "driver_version", "memory.total", "clocks.max.sm", "power.limit", "pstate", "temperature.gpu")
    try:
        line = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
    return dict(zip(fields, (value.strip() for value in line.split(",")), strict=False))


def meminfo_gib() -> float | None:
    """The machine's memory (MemTotal), in GiB."""
    try:
        line = next(row for row in Path("/proc/meminfo").read_text().splitlines() if row.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 2**20


def wheel_versions(folder: Path) -> dict[str, str]:
    """name -> version of the wheels in a folder, from their file names."""
    return dict(wheel_name_and_version(path) for path in sorted(folder.glob("*.whl")))


def wheels_against_pins(wheels: dict[str, str], pins: dict[str, str]) -> list[str]:
    """One line per wheel that is not at this project's pin (or not pinned at all)."""
    return [
        f"{name} {version} (pinned: {pins.get(name, 'not pinned')})"
        for name, version in wheels.items()
        if pins.get(name) != version
    ]


def install(check: Check, deadline: float) -> Outcome:
    """Install the carried wheels beside the machine's packages (never over torch), then import everything."""
    wheels = wheel_versions(check.wheels) if check.wheels.is_dir() else {}
    found = check.records["environment"]["result"]["found"]["packages"]
    result: dict[str, Any] = {
        "folder": str(check.wheels),
        "wheels": wheels,
        "machine_had": {name: found.get(name) for name in PACKAGES},
    }
    wrong = wheels_against_pins(wheels, pinned_versions())
    if wrong:
        return Outcome("failed", "wheels off the pins, run scripts/gpu-wheels: " + "; ".join(wrong), result)
    note = ""
    if not wheels:
        note = f"no wheels in {check.wheels} (scripts/gpu-wheels makes them): the packages found are used"
    elif check.dry_run:
        note = "dry run: wheels checked against the pins, not installed (they are for CPython 3.12)"
    else:
        site = check.work / "site"
        shutil.rmtree(site, ignore_errors=True)
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile"]
        command += ["--no-cache-dir", "--disable-pip-version-check", "--target", str(site)]
        finished = run_command(check, [*command, *map(str, sorted(check.wheels.glob("*.whl")))], deadline)
        result["pip_s"] = finished.seconds
        if finished.returncode != 0:
            return ended(finished, result)
        check.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), check.env.get("PYTHONPATH")]))
    finished, result["ran_with"] = run_child(
        check, "versions", {"imports": list(IMPORTS), "carried": sorted(wheels)}, deadline
    )
    failed_imports = result["ran_with"].get("import_errors")
    if finished.returncode == 0 and failed_imports:
        return Outcome("failed", "; ".join(f"import {name}: {error}" for name, error in failed_imports.items()), result)
    return ended(finished, result, note)


def weights(check: Check, deadline: float) -> Outcome:
    """Random weights of the plan's size on the plan's device, in the layout download-weights writes."""
    if check.given_weights is not None:
        check.weights = check.given_weights
        return Outcome("passed", f"given: {check.given_weights}", {"folder": str(check.given_weights), "made": False})
    folder = check.work / f"weights-{check.plan.weights_size}-{check.accelerator}"
    params = {"folder": str(folder), "size": check.plan.weights_size, "device": check.plan.device,
              "accelerator": check.accelerator}  # fmt: skip
    finished, result = run_child(check, "weights", params, deadline)
    result = {**params, **result, "made": True, "seconds": finished.seconds}
    outcome = ended(finished, result, f"{folder}: {check.plan.weights_size} weights")
    if outcome.status == "passed":
        check.weights = folder
    return outcome


def cuda_tests(check: Check, deadline: float) -> Outcome:
    """The tests marked `cuda`, run by pytest in a child on this run's weights: each test's outcome and the figures
    it recorded."""
    finished, result = run_child(check, "cuda-tests", {"weights": str(check.weights), "tests": CUDA_TESTS}, deadline)
    tests = result.get("tests", {})
    outcomes = {test["outcome"] for test in tests.values()}
    if finished.timed_out:
        return ended(finished, result)
    if not tests or outcomes & {"FAILED", "ERROR"} or finished.returncode != 0:
        failed = [name for name, test in tests.items() if test["outcome"] in ("FAILED", "ERROR")]
        return Outcome("failed", ", ".join(failed) or finished.last_line(), result)
    if outcomes == {"SKIPPED"}:
        reasons = sorted({test["note"] for test in tests.values() if "note" in test})
        return Outcome("skipped", "; ".join(reasons), result)
    return Outcome("passed", f"{len(tests)} tests", result)


def benchmark(check: Check, deadline: float) -> Outcome:
    """The benchmark against plain diffusers, one grid point at a time, the most telling first."""
    params = {
        "weights": str(check.weights),
        "points": check.plan.benchmark_points,
        "warmup": check.plan.benchmark_warmup,
        "repeats": check.plan.benchmark_repeats,
        "out": str(check.out),
        "scratch": str(check.work / "benchmark"),
        "weights_kind": f"{'full-size' if check.plan.weights_size == 'full' else 'tiny'} random",
        "commit": check.meta["commit"],
    }
    finished, result = run_child(check, "benchmark", params, deadline)
    done = len(result.get("points", []))
    return ended(finished, result, f"{done} of {len(check.plan.benchmark_points)} grid points")


def measurement_stage(what: str, options: Callable[[Plan], dict[str, Any]]) -> Callable[[Check, float], Outcome]:
    """A stage running `scripts/measure <what>` on this run's weights in a child, keeping the table it returns."""

    def run(check: Check, deadline: float) -> Outcome:
        params = {"what": what, "weights": str(check.weights), **options(check.plan)}
        finished, result = run_child(check, "measure", params, deadline)
        flags = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in options(check.plan).items())
        return ended(finished, {"command": f"scripts/measure {what} --weights WEIGHTS {flags}".strip(), **result})

    return run


def compile_stage(check: Check, deadline: float) -> Outcome:
    """COMPILE=1: the first boot's compile and warm-up, then compiled against eager edits interleaved; then a second
    boot reading the cache the first one filled, when the budget leaves room for it."""
    cache = check.work / "compile-cache"
    params = {
        "weights": str(check.weights),
        "warmup": check.plan.benchmark_warmup,
        "side": check.plan.compile_side,
        "repeats": check.plan.compile_repeats,
        "compiles": check.plan.compiles,
        "scratch": str(check.work / "compile"),
    }
    env = {**check.env, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    result: dict[str, Any] = {"compiles": check.plan.compiles, "side": check.plan.compile_side}
    result["cache_was_empty"] = not any(cache.glob("*"))
    finished, result["first_boot"] = run_child(check, "compile", {**params, "against_eager": True}, deadline, env)
    if finished.returncode != 0:
        return ended(finished, result)
    if check.dry_run:
        return Outcome("passed", "dry run: nothing compiled, so no second boot (no cache to read)", result)
    left = deadline - time.perf_counter()
    if left < SECOND_BOOT_MIN_S:
        return Outcome("passed", f"no second boot: {left:.0f} s left", result)
    finished, result["second_boot"] = run_child(check, "compile", {**params, "against_eager": False}, deadline, env)
    return ended(finished, result, "second boot read the first one's cache")


def lora_options(plan: Plan) -> dict[str, Any]:
    """UNet calls at the plan's size (1024 px on the GPU: the serving shape)."""
    return {"size": plan.lora_size, "repeats": plan.measure_repeats}


def every_layer_options(plan: Plan) -> dict[str, Any]:
    """A LoRA on every layer and bias a file can change (ComfyUI's extraction): its merge, switch and remove."""
    return {"layers": "every", "repeats": 1}


def training_options(plan: Plan) -> dict[str, Any]:
    """Steps at the plan's size (1024 px on the GPU, the default resolution) with batch 1 and 4."""
    return {"resolution": plan.lora_size, "batches": "1,4", "steps": 5}


def repeat_options(plan: Plan) -> dict[str, Any]:
    return {"repeats": plan.measure_repeats}


def eight_gb_card(plan: Plan) -> dict[str, Any]:
    """The card the low-memory mode is measured on: 8 GB, emulated on the lent GPU."""
    return {"memory_gib": 8.0}


STAGES = (
    Stage("environment", 30, environment, describe_environment),
    Stage("install", 60, install, describe_install, ("environment",)),
    Stage("weights", 75, weights, describe_weights, ("install",)),
    Stage("cuda-tests", 75, cuda_tests, describe_tests, ("weights",)),
    Stage("benchmark", 90, benchmark, describe_benchmark, ("weights",)),
    Stage("training", 75, measurement_stage("training", training_options), describe_measurement, ("weights",)),
    Stage("compile", 120, compile_stage, describe_compile, ("weights",)),
    Stage("loras", 60, measurement_stage("loras", lora_options), describe_measurement, ("weights",)),
    Stage("loras-every-layer", 45, measurement_stage("loras", every_layer_options), describe_measurement, ("weights",)),
    Stage("safety-checker", 45, measurement_stage("safety", repeat_options), describe_measurement, ("weights",)),
    Stage("maps", 30, measurement_stage("maps", repeat_options), describe_measurement, ("weights",)),
    Stage("low-memory", 45, measurement_stage("low-memory", eight_gb_card), describe_measurement, ("weights",)),
)
