"""scripts/gpu-check (models/tooling/gpu_check): its dry run (every stage, on tiny weights on the CPU), how it keeps
to its time budgets and writes as it goes, and what it checks of the carried wheels; scripts/gpu-wheels' choice of
wheels; and make-test-weights' device option."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from models.tooling import gpu_wheels
from models.tooling.gpu_check import runner, stages
from models.tooling.gpu_check.child import OutcomeRecorder, Progress
from models.tooling.gpu_check.plan import GPU_PLAN
from models.tooling.gpu_check.report import describe_measurement
from models.tooling.random_weights.build import parse_args as make_test_weights_args
from tests.gpu import test_gpu

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["environment", "install", "weights", "cuda-tests", "benchmark", "training", "compile", "loras",
          "loras-every-layer", "safety-checker", "maps", "low-memory"]  # fmt: skip
MEASUREMENTS = ("training", "loras", "loras-every-layer", "safety-checker", "maps", "low-memory")
OUTPUT_FILES = {"gpu-check.json", "gpu-check.md", "gpu-check.log", "benchmark.json", "benchmark.md"}
TOOL_FILE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
"""What the device tool brings back from $OUT: at most 8 files, named in these characters, 16 MiB each."""


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> SimpleNamespace:
    out, work = tmp_path_factory.mktemp("gpu-check-out"), tmp_path_factory.mktemp("gpu-check-work")
    command = [sys.executable, str(ROOT / "scripts" / "gpu-check"), "--dry-run", "--out", str(out), "--work", str(work)]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900)
    report = json.loads((out / "gpu-check.json").read_text())
    return SimpleNamespace(
        out=out,
        returncode=finished.returncode,
        stdout=finished.stdout,
        seconds=time.perf_counter() - started,
        stages=report["stages"],
        meta=report["meta"],
        summary=(out / "gpu-check.md").read_text(),
    )


@pytest.mark.slow
def test_dry_run_runs_every_stage_on_tiny_weights_on_the_cpu(dry_run):
    expected = {**dict.fromkeys(STAGES, "passed"), "cuda-tests": "skipped"}
    assert list(dry_run.stages) == STAGES
    assert {name: record["status"] for name, record in dry_run.stages.items()} == expected, dry_run.stdout
    assert dry_run.returncode == 0 and dry_run.meta["dry_run"]
    stages = {name: record["result"] for name, record in dry_run.stages.items()}
    assert stages["environment"]["found"]["torch"] == torch.__version__
    assert stages["install"]["ran_with"]["import_errors"] == {}
    assert stages["weights"]["size"] == "tiny" and stages["weights"]["bytes"] > 0


@pytest.mark.slow
def test_dry_run_collects_every_cuda_test_as_skipped_without_cuda(dry_run):
    tests = dry_run.stages["cuda-tests"]["result"]["tests"]
    assert set(tests) == {name for name in dir(test_gpu) if name.startswith("test_")}
    assert {test["outcome"] for test in tests.values()} == {"SKIPPED"}
    assert dry_run.stages["cuda-tests"]["note"] == "needs a CUDA device"


@pytest.mark.slow
def test_dry_run_benchmarks_each_grid_point_and_times_the_compile_path(dry_run):
    points = dry_run.stages["benchmark"]["result"]["points"]
    assert [(point["size"], point["batch"]) for point in points] == [("256x256", 1), ("384x256", 1)]
    assert all(point["ours_ms"] > 0 and point["diffusers_ms"] > 0 and point["floor_ms"] > 0 for point in points)
    tables = (dry_run.out / "benchmark.md").read_text()
    assert "| 256x256 | 1 |" in tables and "| 384x256 | 1 |" in tables
    assert len(json.loads((dry_run.out / "benchmark.json").read_text())["results"]) == 2
    for stage in MEASUREMENTS:
        result = dry_run.stages[stage]["result"]
        assert result["title"].endswith(" on cpu (float32)") and len(result["rows"]) > 1
    loras = [label for label, _ in dry_run.stages["loras"]["result"]["rows"]]
    assert "apply (none to A)" in loras and "remove (restore the reference)" in loras
    assert "```" in dry_run.summary and "apply (none to A)" in dry_run.summary
    compiled = dry_run.stages["compile"]["result"]
    boot = compiled["first_boot"]
    assert not compiled["compiles"] and "second_boot" not in compiled
    assert boot["setup_s"] > boot["compile_and_warm_up_s"] > 0
    assert boot["compiled"]["median_s"] > 0 and boot["eager"]["median_s"] > 0 and boot["speedup"] > 0


@pytest.mark.slow
def test_dry_run_writes_only_files_the_device_tool_brings_back(dry_run):
    files = {path.name: path.stat().st_size for path in dry_run.out.rglob("*")}
    assert set(files) == OUTPUT_FILES
    assert all(TOOL_FILE_NAME.match(name) and size < 16 * 2**20 for name, size in files.items())
    for name in STAGES:
        assert re.search(rf"^\| {name} \| {dry_run.stages[name]['status']} \|", dry_run.summary, re.MULTILINE)
    assert "## benchmark" in dry_run.summary and "## compile" in dry_run.summary
    assert dry_run.stdout.rstrip().endswith(dry_run.summary.split("\n## ")[0].rstrip())


def new_check(tmp_path: Path, budget_s: float):
    """A run with its budgets as on the GPU (the dry run's are scaled), for stages the test makes up."""
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    log = open(out / "gpu-check.log", "a", encoding="utf-8")  # noqa: SIM115 - closed by the test
    started = time.perf_counter()
    check = runner.Check(
        plan=GPU_PLAN,
        dry_run=False,
        out=out,
        work=work,
        wheels=work / "wheels",
        given_weights=None,
        deadline=started + budget_s,
        started=started,
        command="scripts/gpu-check (test)",
        env={"PATH": "/usr/bin:/bin"},
        log=log,
    )
    check.meta = {"date": "today", "commit": "abc", "dirty": False, "command": check.command, "budget_s": budget_s}
    return check


def test_a_stage_past_its_budget_is_stopped_keeps_what_it_wrote_and_the_others_still_run(tmp_path):
    def slow(check, deadline):
        partial = check.work / "partial.json"
        code = f"import json, time; open({str(partial)!r}, 'w').write(json.dumps({{'first': 1}})); time.sleep(60)"
        finished = runner.run_command(check, [sys.executable, "-c", code], deadline)
        return runner.ended(finished, json.loads(partial.read_text()))

    def broken(check, deadline):
        raise ValueError("a bug")

    def quick(check, deadline):
        return runner.Outcome("passed", "", {"command": "quick", "title": "x on cpu (float32)", "rows": [["a", "1"]]})

    Stage, describe = runner.Stage, describe_measurement
    made_up = (
        Stage("slow", 3, slow, describe),
        Stage("after-slow", 5, quick, describe, ("slow",)),
        Stage("broken", 5, broken, describe),
        Stage("independent", 5, quick, describe),
    )
    check = new_check(tmp_path, budget_s=60)
    with check.log:
        started = time.perf_counter()
        runner.run_stages(check, made_up, {stage.name for stage in made_up})
    assert time.perf_counter() - started < 30
    report = json.loads((check.out / "gpu-check.json").read_text())["stages"]
    assert {name: record["status"] for name, record in report.items()} == {
        "slow": "timed out",
        "after-slow": "skipped",
        "broken": "failed",
        "independent": "passed",
    }
    assert report["slow"]["result"] == {"first": 1}
    assert report["after-slow"]["note"] == "needs slow" and report["broken"]["note"] == "ValueError: a bug"
    assert "| independent | passed |" in (check.out / "gpu-check.md").read_text()


def test_stages_left_when_the_whole_budget_is_spent_are_skipped_and_reported(tmp_path):
    def never(check, deadline):
        pytest.fail("a stage started with no time left")

    made_up = tuple(runner.Stage(name, 30, never, describe_measurement) for name in ("first", "second"))
    check = new_check(tmp_path, budget_s=1)
    with check.log:
        runner.run_stages(check, made_up, {"first", "second"})
    report = json.loads((check.out / "gpu-check.json").read_text())["stages"]
    assert report["first"]["status"] == "skipped" and report["first"]["note"].startswith("out of time")
    assert report["second"]["status"] == "skipped"


def test_selected_stages_bring_their_prerequisites():
    assert runner.with_prerequisites({"compile"}, stages.STAGES) == {
        "compile",
        "weights",
        "install",
        "environment",
    }


def test_wheels_are_read_from_their_names_and_checked_against_the_pins(tmp_path):
    for name in ("pillow_heif-1.8.1-cp312-cp312-manylinux_2_28_x86_64.whl", "diffusers-0.41.0-py3-none-any.whl"):
        (tmp_path / name).touch()
    wheels = stages.wheel_versions(tmp_path)
    assert wheels == {"pillow-heif": "1.8.1", "diffusers": "0.41.0"}
    pins = {"pillow-heif": "1.8.1", "diffusers": "0.42.1"}
    assert stages.wheels_against_pins(wheels, pins) == ["diffusers 0.41.0 (pinned: 0.42.1)"]


def test_pytest_reports_give_each_test_its_outcome_and_message(tmp_path):
    """The cuda-tests stage reads outcomes from pytest's own reports (a plugin in its child), not from its output."""
    (tmp_path / "test_made_up.py").write_text(
        "import pytest\n\n"
        "def test_a():\n    pass\n\n"
        "def test_b():\n    assert False, 'the CUDA cache was not emptied'\n\n"
        "@pytest.mark.skip(reason='needs a CUDA device')\ndef test_c():\n    pass\n"
    )
    outcomes = OutcomeRecorder(Progress(tmp_path / "result.json"))
    pytest.main([str(tmp_path / "test_made_up.py"), "-q", "-p", "no:cacheprovider"], plugins=[outcomes])
    assert outcomes.tests["test_a"] == {"outcome": "PASSED"}
    assert outcomes.tests["test_b"]["outcome"] == "FAILED"
    assert outcomes.tests["test_b"]["note"].startswith("AssertionError: the CUDA cache was not emptied")
    assert outcomes.tests["test_c"] == {"outcome": "SKIPPED", "note": "needs a CUDA device"}
    assert json.loads((tmp_path / "result.json").read_text())["tests"] == outcomes.tests


def test_gpu_wheels_decides_for_every_pinned_serving_package():
    """Each package requirements.txt pins is carried or left at the machine's version, with a reason; never both."""
    serving = {gpu_wheels.normalised(line.split("==")[0]) for line in (ROOT / "requirements.txt").read_text().split()
               if "==" in line}  # fmt: skip
    carried, kept = set(gpu_wheels.CARRIED), set(gpu_wheels.KEPT)
    assert carried.isdisjoint(kept) and "torch" in kept
    assert serving <= carried | kept
    assert carried <= set(gpu_wheels.pinned_versions())


def test_make_test_weights_fills_on_the_cpu_by_default_and_refuses_cuda_without_one(monkeypatch):
    assert make_test_weights_args(["folder"]).device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        make_test_weights_args(["folder", "--device", "cuda"])
