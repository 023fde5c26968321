"""scripts/measure-heap: each policy's server, its soak figures and its speed against plain diffusers."""

import json
import subprocess
import sys

from tests.scripts import ROOT, load_script


def test_soak_figures_compare_the_warm_up_with_the_rest():
    measure_heap = load_script("measure-heap")
    mib = 2**20
    rss = [100 * mib] * measure_heap.SOAK_WARM_UP + [90 * mib, 130 * mib, 120 * mib]
    figures = measure_heap.soak_figures(rss)
    assert [figures[key] for key in ("warm_mib", "later_mib", "last_mib", "growth_mib")] == [100, 130, 120, 30]


def test_one_policy_served_and_timed_against_diffusers(tiny_weights, tmp_path):
    command = [sys.executable, str(ROOT / "scripts" / "measure-heap"), "--weights", str(tiny_weights)]
    options = ["--policies", "glibc", "--skip-soak", "--warmup", "0", "--repeats", "2", "--out", str(tmp_path)]
    subprocess.run([*command, *options], check=True, capture_output=True)
    report = json.loads((tmp_path / "heap.json").read_text())
    assert report["soak"] == {} and set(report["speed"]) == {"diffusers", "glibc"}
    glibc, diffusers = report["speed"]["glibc"], report["speed"]["diffusers"]
    pairs = zip(glibc["runs_s"], diffusers["runs_s"], strict=True)
    assert glibc["paired_speedups"] == [base / own for own, base in pairs]
    assert "cog_outside_run" in glibc["stages_s"]
    table = (tmp_path / "heap.md").read_text()
    assert "| glibc | - | - | - |" in table
