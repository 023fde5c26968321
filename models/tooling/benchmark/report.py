"""The benchmark's Markdown tables, from its report."""

import statistics
from pathlib import Path
from typing import Any

SERVER_TARGET = 1.1
"""The target: a prediction's predict_time through Cog's server at most this many times the wall time of plain
diffusers doing the same edit (decode and encode included), the two alternating in one run."""


def markdown(report: dict) -> str:
    """The tables: latency and memory per grid point, then the server's figures when measured, then stages."""
    meta = report["meta"]
    lines = [
        f"### {meta['device_name']}, {meta['dtype']}, {meta['weights_kind']} weights",
        "",
        f"{meta['date']}, commit {meta['commit']}, `{meta['command']}`; "
        f"{meta['steps']} steps, the map changing {'every pixel' if meta['change'] == 'all' else 'the top half'}, "
        f"{meta['output_format']} outputs; {meta['repeats']} repeats after {meta['warmup']} warm-up, the paths run "
        f"{meta['order']}; matmul rate measured {meta['matmul_tflops']:.2f} TFLOP/s; weights in memory: ours "
        f"{meta['weights_gib']['ours']:.2f} GiB, diffusers "
        + (
            "the same tensors (stock unfused modules built around ours)"
            if meta["baseline_shares_our_weights"]
            else f"{meta['weights_gib']['diffusers']:.2f} GiB"
        )
        + "; the baseline's LoRA: "
        + (f"`{Path(meta['baseline_lora']).name}`, loaded unfused (peft)" if meta["baseline_lora"] else "none")
        + ". Memory is the peak above the loaded weights.",
        "",
        "| size | batch | ours median (ms) | spread (ms) | ours memory (MiB) | diffusers median (ms) | speed-up "
        "| paired speed-ups | diffusers memory (MiB) | floor (ms) | ours / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        ours, base, pairs = row["ours"], row.get("diffusers"), row.get("paired_speedups")
        cells = [
            row["size"],
            str(row["batch"]),
            f"{ours['median_s'] * 1e3:.0f}",
            f"{ours['min_s'] * 1e3:.0f}-{ours['max_s'] * 1e3:.0f}",
            f"{ours['peak_working_memory_bytes'] / 2**20:.0f}",
            f"{base['median_s'] * 1e3:.0f}" if base else "n/a",
            f"{base['median_s'] / ours['median_s']:.2f}x" if base else "n/a",
            pair_summary(pairs) if pairs else "n/a",
            f"{base['peak_working_memory_bytes'] / 2**20:.0f}" if base else "n/a",
            f"{row['floor_s'] * 1e3:.1f}",
            f"{ours['median_s'] / row['floor_s']:.1f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    served = [row for row in report["results"] if "server" in row]
    if served:
        lines += server_table(served)
    lines += stage_table(
        "Stages of our path (median ms; UNet steps from one extra run that synchronises after each):",
        [(row, row["stages_s"]) for row in report["results"]],
    )
    lines += stage_table(
        "Through Cog's server (median ms): the predictor's stages from the metrics it records with each prediction, the"
        " rest of the service's run, Cog outside it (data URIs to files, validation, files to data URIs), HTTP and"
        " JSON; they add up to the client's wall time of the request:",
        [(row, row["server"]["stages_s"]) for row in served],
    )
    profiled = [(row, row["diffusers"]["profiled_s"]) for row in report["results"] if "diffusers" in row]
    lines += stage_table(
        "Stages of plain diffusers (ms, one extra run timing the modules' forward calls; pipeline is the whole call):",
        profiled,
    )
    return "\n".join(lines) + "\n"


def server_table(rows: list[dict]) -> list[str]:
    """Predict_time through Cog's server against plain diffusers' wall time, pair by pair, against SERVER_TARGET."""
    lines = [
        "",
        f"Through Cog's HTTP server (data-URI inputs, outputs read back): the prediction's `predict_time`, the client's"
        f" wall time, and predict_time over plain diffusers' wall time in the same repeat (target: at most"
        f" {SERVER_TARGET}x):",
        "",
        "| size | batch | predict_time median (ms) | spread (ms) | client wall median (ms) | ours in process median"
        " (ms) | diffusers median (ms) | server / diffusers | paired | pairs within target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        server, base, pairs = row["server"], row.get("diffusers"), row.get("server_paired_speedups")
        ratios = [1 / pair for pair in pairs] if pairs else None
        cells = [
            row["size"],
            str(row["batch"]),
            f"{server['median_s'] * 1e3:.0f}",
            f"{server['min_s'] * 1e3:.0f}-{server['max_s'] * 1e3:.0f}",
            f"{statistics.median(server['wall_s']) * 1e3:.0f}",
            f"{row['ours']['median_s'] * 1e3:.0f}",
            f"{base['median_s'] * 1e3:.0f}" if base else "n/a",
            f"{server['median_s'] / base['median_s']:.2f}x" if base else "n/a",
            f"{min(ratios):.2f}-{max(ratios):.2f}x" if ratios else "n/a",
            f"{sum(ratio <= SERVER_TARGET for ratio in ratios)} of {len(ratios)}" if ratios else "n/a",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def stage_table(title: str, rows: list[tuple[dict, dict[str, float]]]) -> list[str]:
    if not rows:
        return []
    names = list(dict.fromkeys(name for _, stages in rows for name in stages))
    lines = ["", title, "", "| size | batch | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for row, stages in rows:
        cells = [f"{stages[name] * 1e3:.0f}" if name in stages else "" for name in names]
        lines.append(f"| {row['size']} | {row['batch']} | " + " | ".join(cells) + " |")
    return lines


def pair_summary(ratios: list[float]) -> str:
    """Run-by-run speed-ups as the reports give them: their range, and how many the faster path won."""
    return f"{min(ratios):.2f}-{max(ratios):.2f}x, ahead in {sum(ratio > 1 for ratio in ratios)} of {len(ratios)}"


def point_summary(row: dict[str, Any]) -> dict[str, Any]:
    """The figures of one grid point that the summary shows."""
    ours, base, pairs = row["ours"], row.get("diffusers"), row.get("paired_speedups")
    return {
        "size": row["size"],
        "batch": row["batch"],
        "ours_ms": ours["median_s"] * 1e3,
        "diffusers_ms": base["median_s"] * 1e3 if base else None,
        "speedup": base["median_s"] / ours["median_s"] if base else None,
        "pairs": pair_summary(pairs) if pairs else "",
        "floor_ms": row["floor_s"] * 1e3,
        "ours_over_floor": ours["median_s"] / row["floor_s"],
        "ours_memory_mib": ours["peak_working_memory_bytes"] / 2**20,
    }
