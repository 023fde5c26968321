"""`scripts/measure`: its tables and their JSON, and the heap measurement (each policy's server, its soak figures and
its speed against plain diffusers)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.tooling.measure.heap import soak_figures
from models.tooling.soak import SOAK_WARM_UP

ROOT = Path(__file__).resolve().parents[2]


def measure(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "measure"), *arguments], check=True,
                          capture_output=True, text=True)  # fmt: skip


def test_soak_figures_compare_the_warm_up_with_the_rest():
    mib = 2**20
    rss = [100 * mib] * SOAK_WARM_UP + [90 * mib, 130 * mib, 120 * mib]
    figures = soak_figures(rss)
    assert [figures[key] for key in ("warm_mib", "later_mib", "last_mib", "growth_mib")] == [100, 130, 120, 30]


@pytest.mark.slow
def test_a_measurement_prints_its_table_and_writes_its_figures(tiny_weights, tmp_path):
    finished = measure("safety", "--weights", str(tiny_weights), "--repeats", "1", "--json", str(tmp_path / "s.json"))
    table = json.loads((tmp_path / "s.json").read_text())
    assert table["title"] == f"{tiny_weights} on cpu (float32)"
    assert [label for label, _ in table["rows"]] == [
        "1 output, 1024x1024", "4 outputs, 1024x1024", "1 output 4000x3000 + its 1000x1000 crop",
    ]  # fmt: skip
    assert all(len(seconds) == 1 and seconds[0] > 0 for seconds in table["figures"].values())
    assert finished.stdout.splitlines()[0] == table["title"]


@pytest.mark.server
def test_one_policy_served_and_timed_against_diffusers(tiny_weights, tmp_path):
    options = ["--policies", "glibc", "--skip-soak", "--warmup", "0", "--repeats", "2", "--out", str(tmp_path)]
    measure("heap", "--weights", str(tiny_weights), *options)
    report = json.loads((tmp_path / "heap.json").read_text())
    assert report["soak"] == {} and set(report["speed"]) == {"diffusers", "glibc"}
    glibc, diffusers = report["speed"]["glibc"], report["speed"]["diffusers"]
    pairs = zip(glibc["runs_s"], diffusers["runs_s"], strict=True)
    assert glibc["paired_speedups"] == [base / own for own, base in pairs]
    assert "cog_outside_run" in glibc["stages_s"]
    table = (tmp_path / "heap.md").read_text()
    assert "| glibc | - | - | - |" in table
