"""The benchmark's quick mode runs the real predictor path and plain diffusers, and writes its tables."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_writes_json_and_markdown(tiny_weights, tmp_path):
    command = [sys.executable, str(ROOT / "scripts" / "benchmark"), "--quick", "--weights", str(tiny_weights)]
    subprocess.run([*command, "--out", str(tmp_path)], check=True, capture_output=True)
    report = json.loads((tmp_path / "benchmark.json").read_text())
    [row] = report["results"]
    assert row["size"] == "256x256" and row["batch"] == 1
    assert {"decode_inputs", "vae_encode", "text_encode", "vae_decode", "composite", "encode_outputs"} <= set(
        row["stages_s"]
    )
    assert [name for name in row["stages_s"] if name.startswith("unet_step")] == [
        f"unet_step_{i}" for i in (1, 2, 3, 4)
    ]
    assert row["ours"]["median_s"] > 0 and row["diffusers"]["median_s"] > 0
    assert row["total_flops"] > 4 * row["flops"]["unet_step"] > 0 and row["floor_s"] > 0
    assert row["ours"]["peak_working_memory_bytes"] > 0 and report["meta"]["order"] == "interleaved"
    table = (tmp_path / "benchmark.md").read_text()
    assert "| 256x256 | 1 |" in table and "speed-up" in table
