"""Running the stages: each within its time budget and the whole run's, in child processes stopped at their
deadline, the report rewritten after every stage so that a run cut short keeps what it measured."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ...accelerators import DEFAULT_ACCELERATOR
from ..files import write_atomically
from .plan import MIN_STAGE_S, REPORT, ROOT, STOP_GRACE_S, SUMMARY, Plan
from .report import markdown


@dataclass
class Outcome:
    """A stage's end: passed, failed, timed out, skipped or not available, with a one-line note and its figures."""

    status: str
    note: str = ""
    result: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """One step of the check: run(check, deadline on the perf_counter clock) -> Outcome; describe(result) -> Markdown
    lines of its section in gpu-check.md."""

    name: str
    budget_s: float
    run: Callable[[Check, float], Outcome]
    describe: Callable[[dict[str, Any]], list[str]]
    needs: tuple[str, ...] = ()


@dataclass
class Check:
    """The run in progress: options, folders, the children's environment, the clock and the report so far."""

    plan: Plan
    dry_run: bool
    out: Path
    work: Path
    wheels: Path
    given_weights: Path | None
    deadline: float
    started: float
    command: str
    env: dict[str, str]
    log: IO[str]
    weights: Path | None = None
    accelerator: str = DEFAULT_ACCELERATOR
    """Whose LoRA and step rule the random weights carry (every stage then runs under it)."""
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def left_s(self) -> float:
        return self.deadline - time.perf_counter()

    def say(self, line: str) -> None:
        """A progress line, to the terminal (the device tool's output tail) and the log."""
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()


@dataclass(frozen=True)
class Finished:
    """A child process's end: its exit status (None: stopped at its limit), seconds and what it printed."""

    returncode: int | None
    seconds: float
    output: str

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def last_line(self) -> str:
        lines = [line.strip() for line in self.output.splitlines() if line.strip()]
        return lines[-1] if lines else f"exit status {self.returncode}"


def run_command(check: Check, command: list[str], deadline: float, env: dict[str, str] | None = None) -> Finished:
    """Run a child in its own process group, its output appended to the log; stop it, group and all, at the deadline."""
    check.log.flush()
    offset = os.fstat(check.log.fileno()).st_size
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=ROOT, env=env or check.env, stdout=check.log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        returncode: int | None = process.wait(timeout=max(0.0, deadline - started))
    except subprocess.TimeoutExpired:
        stop(process)
        returncode = None
    seconds = time.perf_counter() - started
    with open(check.log.name, "rb") as log:
        log.seek(offset)
        output = log.read().decode("utf-8", errors="replace")
    return Finished(returncode, seconds, output)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the child's process group, SIGKILL after a grace period."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(
    check: Check, name: str, params: dict[str, Any], deadline: float, env: dict[str, str] | None = None
) -> tuple[Finished, dict[str, Any]]:
    """Run a child task (models/tooling/gpu_check/child.py); returns how it ended and the figures it wrote (partial
    if stopped)."""
    result_path = check.work / f"{name}.result.json"
    result_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "models.tooling.gpu_check.child", name, json.dumps(params), str(result_path)]
    finished = run_command(check, command, deadline, env)
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    return finished, result


def ended(finished: Finished, result: dict[str, Any], note: str = "") -> Outcome:
    """passed, failed (with the child's last line) or timed out, keeping the figures either way."""
    if finished.timed_out:
        return Outcome("timed out", f"stopped after {finished.seconds:.0f} s; figures so far kept", result)
    if finished.returncode != 0:
        return Outcome("failed", finished.last_line(), result)
    return Outcome("passed", note, result)


# Stages -----------------------------------------------------------------------------------------------------------


def run_stages(check: Check, stages: tuple[Stage, ...], selected: set[str]) -> None:
    """Each selected stage in order, within its budget and the whole run's; the report rewritten after each."""
    for stage in stages:
        check.records[stage.name] = {"status": "pending", "budget_s": stage.budget_s * check.plan.time_scale}
    write_report(check, stages)
    for stage in stages:
        record = check.records[stage.name]
        blocked = [need for need in stage.needs if check.records[need]["status"] != "passed"]
        limit_s = min(record["budget_s"], check.left_s())
        if stage.name not in selected:
            outcome = Outcome("skipped", "not selected (--only)")
        elif blocked:
            outcome = Outcome("skipped", f"needs {', '.join(blocked)}")
        elif check.left_s() < MIN_STAGE_S:
            outcome = Outcome("skipped", f"out of time: {max(0.0, check.left_s()):.0f} s of the budget left")
        else:
            check.say(f"== {stage.name} (up to {limit_s:.0f} s)")
            started = time.perf_counter()
            try:
                outcome = stage.run(check, started + limit_s)
            except Exception as error:  # one stage's bug must not cost the others' results
                check.log.write(traceback.format_exc())
                outcome = Outcome("failed", f"{type(error).__name__}: {error}")
            record["seconds"] = time.perf_counter() - started
        record.update(status=outcome.status, note=outcome.note, result=outcome.result)
        check.say(f"   {stage.name}: {outcome.status}" + (f" ({outcome.note})" if outcome.note else ""))
        write_report(check, stages)


def write_report(check: Check, stages: tuple[Stage, ...]) -> None:
    """gpu-check.json and gpu-check.md as they stand, each replaced in one step."""
    check.meta["seconds"] = time.perf_counter() - check.started
    report = {"meta": check.meta, "stages": check.records}
    write_atomically(check.out / REPORT, json.dumps(report, indent=2, default=str))
    write_atomically(check.out / SUMMARY, markdown(check, stages))


def with_prerequisites(names: set[str], stages: tuple[Stage, ...]) -> set[str]:
    """The stages named and every stage they need, directly or not."""
    by_name = {stage.name: stage for stage in stages}
    wanted, queue = set(), list(names)
    while queue:
        name = queue.pop()
        if name not in wanted:
            wanted.add(name)
            queue += by_name[name].needs
    return wanted
