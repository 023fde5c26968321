"""The heap policies of models/heap.py both ways: memory over the soak, and speed through Cog's server.

One Cog server per policy (HEAP_POLICY), all started at once on tiny random weights (made in bench-weights/tiny when
no folder is given). First each server runs the soak (models/tooling/soak.py, 100 varied requests): its worker's RSS
after the warm-up against the rest. Then predictions at 1024x1024, 4 steps, a map changing every pixel, PNG output go
to the servers in turn, alternating with plain diffusers img2img in this process (the benchmark's baseline, PNG encode
included): each server's predict_time over the diffusers run beside it. Writes heap.json and heap.md.
"""

import argparse
import json
import statistics
import tempfile
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

from ... import heap
from ...weights.load import select_device
from ..benchmark.baseline import baseline_lora, diffusers_run, load_diffusers
from ..benchmark.run import edit_values, ensure_weights, make_inputs, server_run
from ..cog_server import RunningServer, file_server, running_cog_server
from ..files import git_commit
from ..measuring import interleaved, paired_speedups
from ..soak import SOAK_WARM_UP, run_soak, write_soak_inputs
from .table import Table

ROOT = Path(__file__).resolve().parents[3]
SIZE = 1024
STEPS = 4


def soak_figures(rss: list[int]) -> dict[str, float]:
    """The worker's RSS in MiB: the most during the warm-up, the most after it, the last, the growth, and all."""
    warm, later = max(rss[:SOAK_WARM_UP]), max(rss[SOAK_WARM_UP:])
    return {
        "warm_mib": warm / 2**20,
        "later_mib": later / 2**20,
        "last_mib": rss[-1] / 2**20,
        "growth_mib": (later - warm) / 2**20,
        "rss_mib": [round(value / 2**20, 1) for value in rss],
    }


def measure_speed(
    servers: dict[str, RunningServer], weights: Path, image_path: Path, map_path: Path, warmup: int, repeats: int
) -> dict:
    """Each server's predictions alternating with plain diffusers in this process, and their ratios pair by pair."""
    device, _ = select_device()
    sdxl = load_diffusers(weights, device, baseline_lora(weights))
    runs = {"diffusers": diffusers_run(sdxl, image_path, 1, STEPS, device, "png")}
    values = edit_values(image_path, map_path, 1, STEPS, "png")
    for policy, server in servers.items():
        runs[policy] = server_run(server, values)
    measured = interleaved(runs, warmup, repeats)
    for policy in servers:
        measured[policy]["paired_speedups"] = paired_speedups(measured, policy)
    return measured


def measure_heap(
    weights: Path | None,
    policies: list[str],
    out: Path,
    warmup: int = 1,
    repeats: int = 8,
    soak: bool = True,
    speed: bool = True,
    command: str = "scripts/measure heap",
) -> dict:
    """The report (soak figures and speed per policy), also written to out/heap.json and out/heap.md."""
    commit = git_commit()
    weights = ensure_weights(weights, "tiny")
    scratch = Path(tempfile.mkdtemp(prefix="measure-heap-"))
    image_path, map_path = make_inputs(scratch, SIZE, SIZE, "all")
    report: dict = {"soak": {}, "speed": {}}
    with ExitStack() as stack:
        servers, temporary = {}, {}
        for policy in policies:
            temporary[policy] = scratch / f"tmp-{policy}"
            temporary[policy].mkdir()
            env = {"HEAP_POLICY": policy, "TMPDIR": str(temporary[policy])}
            log_path = scratch / f"server-{policy}.log"
            servers[policy] = stack.enter_context(running_cog_server(weights, log_path, env=env, startup_timeout=600))
            print(f"{policy}: Cog server ready, log in {log_path}", flush=True)
        if soak:
            files = scratch / "soak"
            files.mkdir()
            write_soak_inputs(files)
            with file_server(files) as url:
                for policy in policies:
                    rss, _ = run_soak(servers[policy], url, temporary[policy])
                    report["soak"][policy] = soak_figures(rss)
                    print(f"{policy}: soak {report['soak'][policy]}", flush=True)
        if speed:
            report["speed"] = measure_speed(servers, weights, image_path, map_path, warmup, repeats)
    report["meta"] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "commit": commit,
        "command": command,
        "weights": str(weights),
        "repeats": repeats,
        "warmup": warmup,
        "default_policy": heap.DEFAULT_POLICY,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "heap.json").write_text(json.dumps(report, indent=2))
    (out / "heap.md").write_text(markdown(report, policies))
    return report


def markdown(report: dict, policies: list[str]) -> str:
    """One row per policy: soak RSS, then predict_time against plain diffusers in the same repeat."""
    meta, speed = report["meta"], report["speed"]
    baseline = f" Plain diffusers median {speed['diffusers']['median_s'] * 1e3:.0f} ms." if speed else ""
    lines = [
        f"{meta['date']}, commit {meta['commit']}, `{meta['command']}`; tiny random weights, {SIZE}x{SIZE}, {STEPS}"
        f" steps, every pixel changed, PNG; {meta['repeats']} repeats after {meta['warmup']} warm-up, alternating."
        + baseline,
        "",
        "| policy | soak RSS warm-up max (MiB) | after (max) | growth | predict_time median (ms) | over diffusers,"
        " median of pairs | pairs |",
        "|---|---|---|---|---|---|---|",
    ]
    for policy in policies:
        soak = report["soak"].get(policy)
        rss = [f"{soak['warm_mib']:.0f}", f"{soak['later_mib']:.0f}", f"{soak['growth_mib']:+.0f}"] if soak else []
        timing = []
        if policy in speed:
            ratios = [1 / pair for pair in speed[policy]["paired_speedups"]]
            timing = [
                f"{speed[policy]['median_s'] * 1e3:.0f}",
                f"{statistics.median(ratios):.2f}x",
                f"{min(ratios):.2f}-{max(ratios):.2f}x",
            ]
        cells = [policy + (" (default)" if policy == meta["default_policy"] else ""), *(rss or ["-"] * 3)]
        lines.append("| " + " | ".join([*cells, *(timing or ["-"] * 3)]) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(parser) -> None:
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--policies", type=policy_names, default=list(heap.POLICIES), help="comma-separated")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--skip-soak", action="store_true", help="speed only")
    parser.add_argument("--skip-speed", action="store_true", help="the soak only")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "heap")


def policy_names(text: str) -> list[str]:
    policies = text.split(",")
    unknown = [policy for policy in policies if policy not in heap.POLICIES]
    if unknown:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown)} not among {', '.join(heap.POLICIES)}")
    return policies


def run(args) -> Table:
    policies = args.policies
    report = measure_heap(args.weights, policies, args.out, args.warmup, args.repeats, not args.skip_soak,
                          not args.skip_speed, command=args.command)  # fmt: skip
    return Table(markdown(report, policies).rstrip(), figures=report)
