"""The first look at the model on a lent GPU, in one command that fits the device tool's few minutes.

    python3 scripts/gpu-check [--out DIR] [--budget 280] [--only STAGE,...]   # on the GPU machine
    python scripts/gpu-check --dry-run [--out DIR]                            # here: tiny weights, CPU, no compiling

Stages, in order, each in child processes with a time budget of its own inside the whole run's: record the machine
and its packages; install the wheels scripts/gpu-wheels prepared (.gpu-wheels, carried by the tool); make full-size
random weights on the GPU; run the tests marked `cuda` (tests/gpu/test_gpu.py); benchmark against plain diffusers on a
short grid; time COMPILE=1's warm-up and its speed at 1024x1024; then the measurements of other features
(`scripts/measure`): user LoRAs, the safety checker, the low-memory mode on an emulated 8 GB card. A stage past its
budget is stopped and keeps what it wrote; a stage whose prerequisite failed is skipped; the order puts first what a
first GPU most needs to answer.

--dry-run runs the same stages on tiny weights on the CPU, with a compiler that compiles nothing, the wheels checked
against the pins rather than installed (they are for CPython 3.12), and every budget times DRY_RUN_TIME_SCALE: this
project's CPU machines are shared, and each child spends seconds importing.

Writes, under --out (default $OUT, else outputs/gpu-check), nothing but: gpu-check.json and gpu-check.md (rewritten
after every stage), benchmark.json and benchmark.md (scripts/benchmark's tables, rewritten after every grid point)
and gpu-check.log (every child's output). The device tool brings back at most 8 files.
"""

import argparse
import dataclasses
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from ...accelerators import ACCELERATORS, DEFAULT_ACCELERATOR
from .plan import DEFAULT_BUDGET_S, DRY_PLAN, GPU_PLAN, LOG, ROOT, SUMMARY, WHEELS
from .report import git
from .runner import Check, run_stages, with_prerequisites
from .stages import STAGES


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "outputs" / "gpu-check"))
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "gpu-check",
        help="weights, installed wheels and caches (default: gpu-check in the temporary folder)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        help=f"seconds for the whole run (default {DEFAULT_BUDGET_S:.0f}, times the dry run's scale)",
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny weights on the CPU, nothing compiled")
    parser.add_argument("--weights", type=Path, help="a weights folder to use instead of making random ones")
    parser.add_argument("--accelerator", choices=tuple(ACCELERATORS), default=DEFAULT_ACCELERATOR,
                        help="whose LoRA layout and step rule the random weights carry (default: flash)")  # fmt: skip
    parser.add_argument("--wheels", type=Path, default=WHEELS, help=f"wheel folder (default: {WHEELS.name})")
    parser.add_argument("--only", help="comma-separated stages to run (and what they need)")
    parser.add_argument(
        "--commit", help="the commit to record where git cannot say (the device tool copies the tree without .git)"
    )
    args = parser.parse_args(argv)
    names = [stage.name for stage in STAGES]
    if args.only and not set(args.only.split(",")) <= set(names):
        parser.error(f"--only: stages are {', '.join(names)}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    budget_s = args.budget or DEFAULT_BUDGET_S * plan.time_scale
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("COMPILE", None)
    if plan.cpu_threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(plan.cpu_threads)
    (args.out / LOG).unlink(missing_ok=True)
    with open(args.out / LOG, "a", encoding="utf-8") as log:
        check = Check(
            plan=plan,
            dry_run=args.dry_run,
            out=args.out,
            work=args.work,
            wheels=args.wheels,
            given_weights=args.weights,
            deadline=started + budget_s,
            started=started,
            command="scripts/gpu-check " + " ".join(argv),
            env=env,
            log=log,
            accelerator=args.accelerator,
        )
        check.meta = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git("rev-parse", "--short", "HEAD") or args.commit or "unknown",
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "command": check.command,
            "dry_run": args.dry_run,
            "accelerator": args.accelerator,
            "budget_s": budget_s,
            "plan": dataclasses.asdict(check.plan),
        }
        names = {stage.name for stage in STAGES}
        selected = with_prerequisites(set(args.only.split(",")), STAGES) if args.only else names
        run_stages(check, STAGES, selected)
        check.say((args.out / SUMMARY).read_text().split("\n## ")[0])
    failed = [name for name, record in check.records.items() if record["status"] in ("failed", "timed out")]
    return 1 if failed else 0
