"""gpu-check.md: the stage table, then each stage's figures in words and tables."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..gpu_wheels import pinned_versions
from ..measure.table import Table
from .plan import PACKAGES, ROOT, TARGET_FLOOR_RATIO, TARGET_MS, TARGET_SPEEDUP

if TYPE_CHECKING:
    from .runner import Check, Stage


def describe_environment(result: dict[str, Any]) -> list[str]:
    found, gpu = result.get("found", {}), result.get("gpu")
    device = found.get("device_name", "none")
    if gpu:
        device += (
            f", driver {gpu.get('driver_version')}, {gpu.get('memory.total')}"
            f", SM clock up to {gpu.get('clocks.max.sm')}, power limit {gpu.get('power.limit')}"
            f", compute capability {found.get('capability')}, {found.get('multiprocessors')} SMs"
        )
    return [
        f"- GPU: {device}",
        f"- torch {found.get('torch')} (CUDA {found.get('cuda_runtime')}, cuDNN {found.get('cudnn')}), Python "
        f"{found.get('python')} ({found.get('executable')})",
        f"- {result.get('cpus')} CPUs, {fmt(result.get('memory_gib'), '.0f')} GiB of memory, "
        f"{fmt(result.get('disk_free_gib'), '.0f')} GiB of free disk; {result.get('platform')}",
    ]


def describe_install(result: dict[str, Any]) -> list[str]:
    ran_with = result.get("ran_with", {})
    packages, had, pins = ran_with.get("packages", {}), result.get("machine_had", {}), pinned_versions()
    wheels = ", ".join(f"{name} {version}" for name, version in result.get("wheels", {}).items()) or "none"
    lines = [
        f"Wheels from `{Path(result.get('folder', '')).name}`: {wheels}"
        + (f"; pip took {result['pip_s']:.1f} s." if "pip_s" in result else "."),
        "",
        "| package | pinned | the machine had | ran with |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {pins.get(name, '')} | {had.get(name) or 'absent'} | {packages.get(name, 'absent')} |"
        for name in PACKAGES
    ]
    unmet = ran_with.get("unmet_requirements")
    if unmet:
        lines += ["", "Requirements of the carried wheels that the installed versions do not meet: " + "; ".join(unmet)]
    return lines


def describe_weights(result: dict[str, Any]) -> list[str]:
    if not result.get("made"):
        return [f"`{result.get('folder')}`, not made by this run."]
    size = f"{result['bytes'] / 1e9:.2f} GB" if "bytes" in result else "unfinished"
    return [
        f"{result.get('size')} random weights filled on {result.get('device')}: {size} in "
        f"{fmt(result.get('seconds'), '.1f')} s (the whole make-test-weights run, imports included)."
    ]


def describe_tests(result: dict[str, Any]) -> list[str]:
    lines = ["| test | outcome | note |", "|---|---|---|"]
    lines += [
        f"| {name} | {test['outcome']} | {test.get('note', '').replace('|', '/')} |"
        for name, test in result.get("tests", {}).items()
    ]
    for name, figures in result.get("figures", {}).items():
        lines += ["", f"{name}: " + ", ".join(f"{key} {json.dumps(value)}" for key, value in figures.items())]
    return lines


def describe_benchmark(result: dict[str, Any]) -> list[str]:
    points = result.get("points", [])
    lines = [
        f"Setup (load_pipeline, eager): {fmt(result.get('setup_s'), '.1f')} s; matmul rate "
        f"{fmt(result.get('matmul_tflops'), '.1f')} TFLOP/s. All tables: benchmark.md.",
        "",
        "| size | batch | ours (ms) | diffusers (ms) | speed-up | paired speed-ups | floor (ms) | ours / floor "
        "| ours memory (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {point['size']} | {point['batch']} | {point['ours_ms']:.0f} | {fmt(point['diffusers_ms'], '.0f')} "
        f"| {fmt(point['speedup'], '.2f')}x | {point['pairs']} | {point['floor_ms']:.1f} "
        f"| {point['ours_over_floor']:.1f}x | {point['ours_memory_mib']:.0f} |"
        for point in points
    ]
    target = next((point for point in points if (point["size"], point["batch"]) == ("1024x1024", 1)), None)
    if target is not None:
        speedup = target["speedup"] or 0.0
        verdicts = [
            f"{target['ours_ms']:.0f} ms (under {TARGET_MS:.0f} ms: {met(target['ours_ms'] < TARGET_MS)})",
            f"{speedup:.2f}x plain diffusers ({TARGET_SPEEDUP:.0f}x: {met(speedup >= TARGET_SPEEDUP)})",
            f"{target['ours_over_floor']:.1f}x the floor (within {TARGET_FLOOR_RATIO}x: "
            f"{met(target['ours_over_floor'] <= TARGET_FLOOR_RATIO)})",
        ]
        lines += ["", "1024x1024, batch 1, against the issue's targets: " + "; ".join(verdicts) + "."]
    return lines


def describe_measurement(result: dict[str, Any]) -> list[str]:
    if not result.get("rows"):
        return []
    table = Table(result["title"], [tuple(row) for row in result["rows"]])
    return [f"`{result['command']}`:", "", "```", *table.text().splitlines(), "```"]


def describe_compile(result: dict[str, Any]) -> list[str]:
    lines = []
    for boot in ("first_boot", "second_boot"):
        figures = result.get(boot)
        if not figures:
            continue
        cache = "the cache empty" if boot == "first_boot" and result["cache_was_empty"] else "the cache as left"
        line = f"- {boot.replace('_', ' ')} ({'inductor' if result['compiles'] else 'nothing compiled'}, {cache}): "
        if "setup_s" not in figures:
            line += f"compiling began {fmt(figures.get('compiling_from_s'), '.1f')} s into setup and did not finish"
        else:
            line += (
                f"setup {figures['setup_s']:.1f} s, of which compiling and the 1024x1024 warm-up "
                f"{figures['compile_and_warm_up_s']:.1f} s"
            )
        if "compiled" in figures:
            side = result["side"]
            line += f"; {side}x{side} batch 1: compiled {figures['compiled']['median_s'] * 1e3:.0f} ms"
        if "speedup" in figures:
            line += (
                f" against eager {figures['eager']['median_s'] * 1e3:.0f} ms, interleaved: "
                f"{figures['speedup']:.2f}x (pairs {figures['pairs']})"
            )
        lines.append(line)
    return lines


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def met(condition: bool) -> str:
    return "met" if condition else "not met"


def markdown(check: Check, stages: tuple[Stage, ...]) -> str:
    """gpu-check.md: the stage table, then each stage's section."""
    meta = check.meta
    lines = [
        f"# GPU check{' (dry run)' if check.dry_run else ''}",
        "",
        f"{meta['date']}, commit {meta['commit']}{' with uncommitted changes' if meta['dirty'] else ''}, "
        f"`{meta['command']}`; budget {meta['budget_s']:.0f} s, {meta['seconds']:.0f} s so far.",
        "",
        "| stage | status | seconds | budget (s) | note |",
        "|---|---|---|---|---|",
    ]
    for stage in stages:
        record = check.records[stage.name]
        seconds = f"{record['seconds']:.1f}" if "seconds" in record else ""
        note = record.get("note", "").replace("|", "/")
        lines.append(f"| {stage.name} | {record['status']} | {seconds} | {record['budget_s']:.0f} | {note} |")
    for stage in stages:
        result = check.records[stage.name].get("result")
        details = stage.describe(result) if result else []
        if details:
            lines += ["", f"## {stage.name}", "", *details]
    return "\n".join(lines) + "\n"


def git(*args: str) -> str:
    """A read-only git command's output; empty where there is no git or no repository (the device's copy)."""
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
