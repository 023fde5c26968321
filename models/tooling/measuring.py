"""Measuring side by side: runs interleaved so that a drifting machine slows them alike, ratios taken pair by pair,
peak working memory, module timings, and writing results as they come."""

import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


class PeakMemory:
    """Peak working memory above what was in use at reset(): GPU allocator, or resident memory on CPU.

    Measured above the loaded weights, so it means the same whether one pipeline or both are loaded.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def _in_use(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _status_bytes("VmRSS:")

    def reset(self, collect: bool = True) -> None:
        """Start measuring from here; collect=False skips the garbage collection (a tenth of a second with models
        loaded) for measurements repeated many times."""
        if collect:
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")
        self.base = self._in_use()

    def peak_bytes(self) -> int:
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else _status_bytes("VmHWM:")
        return max(0, peak - self.base)


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def weight_bytes(*models: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the models' parameters: tensors that are views of one count once."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for m in models for p in m.parameters()}
    return sum(storages.values())


class ModuleTimer:
    """Seconds inside given modules' forward calls, synchronising the device at each boundary: profiled runs only.

    Names ending in "_step" count each call apart (unet_step_1, unet_step_2, ...); others add up.
    """

    def __init__(self, device: torch.device, modules: dict[str, list[torch.nn.Module]]):
        self.device = device
        self.modules = modules
        self.timings: dict[str, float] = {}
        self._handles: list = []

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _hooks(self, stage: str):
        started = []

        def before(module, args):
            started.append(self._now())

        def after(module, args, output):
            seconds = self._now() - started.pop()
            if stage.endswith("_step"):
                calls = sum(name.startswith(stage) for name in self.timings)
                self.timings[f"{stage}_{calls + 1}"] = seconds
            else:
                self.timings[stage] = self.timings.get(stage, 0.0) + seconds

        return before, after

    def __enter__(self) -> "ModuleTimer":
        for stage, modules in self.modules.items():
            for module in modules:
                before, after = self._hooks(stage)
                self._handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()


def interleaved(
    runs: dict[str, Callable[[], dict[str, float] | None]],
    warmup: int,
    repeats: int,
    memory: dict[str, PeakMemory] | None = None,
) -> dict:
    """Median and spread of end-to-end seconds, stage medians and peak working memory, for each path.

    The paths alternate run by run (ABBA order), so a machine whose speed drifts during the benchmark
    slows them alike: a ratio taken side by side, not one block after another. A run may report its own
    end-to-end seconds under "total" (the server's predict_time); the stopwatch's are kept as wall_s.
    Memory is measured for the paths that `memory` names.
    """
    names, memory = list(runs), memory or {}
    for _ in range(warmup):
        for name in names:
            runs[name]()
    totals: dict[str, list[float]] = {name: [] for name in names}
    walls: dict[str, list[float]] = {name: [] for name in names}
    stages: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    peaks: dict[str, int] = dict.fromkeys(memory, 0)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            if name in memory:
                memory[name].reset()
            started = time.perf_counter()
            timings = dict(runs[name]() or {})
            walls[name].append(time.perf_counter() - started)
            totals[name].append(timings.pop("total", walls[name][-1]))
            stages[name].append(timings)
            if name in memory:
                peaks[name] = max(peaks[name], memory[name].peak_bytes())
    return {
        name: {
            "median_s": statistics.median(totals[name]),
            "min_s": min(totals[name]),
            "max_s": max(totals[name]),
            "runs_s": totals[name],
            "wall_s": walls[name],
            "stages_s": {key: statistics.median(s[key] for s in stages[name]) for key in stages[name][0]}
            if stages[name]
            else {},
            **({"peak_working_memory_bytes": peaks[name]} if name in memory else {}),
        }
        for name in names
    }


def paired_speedups(measured: dict, path: str = "ours") -> list[float] | None:
    """Diffusers' time over the path's for each repeat, whose runs were adjacent: None without an interleaved baseline.

    A median ratio near 1 can hide either a steady small lead or noise; the pairs tell them apart.
    """
    if "diffusers" not in measured:
        return None
    return [base / own for own, base in zip(measured[path]["runs_s"], measured["diffusers"]["runs_s"], strict=True)]


def synchronised_seconds(action: Callable[[], object]) -> float:
    """Seconds of one call, the GPU's queued work included."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    action()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started
