"""The benchmark: its quick mode end to end, and the plain-diffusers baseline it compares with."""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from models.acceleration import fuse_qkv_in_place
from tests.scripts import load_script
from tests.test_acceleration import unet_inputs

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
    assert report["meta"]["baseline_shares_our_weights"]
    assert report["meta"]["baseline_lora"] == str(tiny_weights / "flash-lora" / "pytorch_lora_weights.safetensors")
    baseline_stages = row["diffusers"]["profiled_s"]
    assert {"pipeline", "text_encode", "vae_encode", "vae_decode"} <= set(baseline_stages)
    assert [name for name in baseline_stages if name.startswith("unet_step")] == [
        f"unet_step_{i}" for i in (1, 2, 3, 4)
    ]
    [pair] = row["paired_speedups"]
    assert pair == row["diffusers"]["runs_s"][0] / row["ours"]["runs_s"][0]
    table = (tmp_path / "benchmark.md").read_text()
    assert "| 256x256 | 1 |" in table and "speed-up" in table and "Stages of plain diffusers" in table
    assert f"{pair:.2f}-{pair:.2f}x, ahead in {int(pair > 1)} of 1" in table


def test_server_mode_runs_the_predictor_through_cogs_server(tiny_weights, tmp_path):
    """--server: the same edit through Cog's HTTP server beside the in-process paths, with where its time went."""
    benchmark = load_script("benchmark")
    command = [sys.executable, str(ROOT / "scripts" / "benchmark"), "--quick", "--server", "--steps", "1"]
    options = ["--change", "all", "--output-format", "png", "--weights", str(tiny_weights), "--out", str(tmp_path)]
    subprocess.run([*command, *options], check=True, capture_output=True)
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert report["meta"]["server"] and report["meta"]["change"] == "all"
    [row] = report["results"]
    assert row["size"] == "1024x1024" and row["batch"] == 1
    server = row["server"]
    [predict_time], [client_wall] = server["runs_s"], server["wall_s"]
    assert 0 < predict_time < client_wall and "peak_working_memory_bytes" not in server
    stages = server["stages_s"]
    assert {"decode_inputs", "vae_encode", "denoise", "vae_decode", "composite"} <= set(stages)
    assert {"rest_of_run", "cog_outside_run", "http_and_json"} <= set(stages)
    assert predict_time < sum(stages.values()) <= client_wall  # the POST's wall time; the stopwatch's adds checks
    [pair] = row["server_paired_speedups"]
    assert pair == row["diffusers"]["runs_s"][0] / predict_time
    table = (tmp_path / "benchmark.md").read_text()
    assert f"target: at most {benchmark.SERVER_TARGET}x" in table and "| cog_outside_run | http_and_json |" in table


def test_server_mode_refuses_sizes_that_serving_resizes():
    benchmark = load_script("benchmark")
    with pytest.raises(SystemExit):
        benchmark.main(["--server", "--sizes", "1024,512"])


def test_stages_are_read_from_the_predictors_log_line_of_that_prediction(tmp_path):
    benchmark = load_script("benchmark")
    log = tmp_path / "server.log"
    lines = [
        {"fields": {"message": "prediction took 9.00s (vae_encode 5.00s)", "prediction_id": "other"}},
        "not json",
        {"fields": {"message": "prediction took 1.50s (decode_inputs 0.06s, denoise 1.20s)", "prediction_id": "p1"}},
    ]
    log.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines))
    assert benchmark.logged_stages(log, "p1") == (1.5, {"decode_inputs": 0.06, "denoise": 1.2})


def test_paired_speedups_compare_the_runs_of_each_repeat():
    benchmark = load_script("benchmark")
    measured = {"ours": {"runs_s": [1.0, 2.0, 1.0]}, "diffusers": {"runs_s": [1.5, 1.0, 1.0]}}
    assert benchmark.paired_speedups(measured) == [1.5, 0.5, 1.0]
    assert benchmark.paired_speedups({**measured, "server": {"runs_s": [3.0, 1.0, 0.5]}}, "server") == [0.5, 1.0, 2.0]
    assert benchmark.paired_speedups({"ours": {"runs_s": [1.0]}}) is None


def test_baseline_built_around_our_weights_is_stock_diffusers_with_the_same_output(tiny_weights):

    benchmark = load_script("benchmark")
    stock = UNet2DConditionModel.from_pretrained(tiny_weights, subfolder="unet").eval()
    ours = UNet2DConditionModel.from_pretrained(tiny_weights, subfolder="unet").eval()
    fuse_qkv_in_place(ours)
    baseline = benchmark.plain_copy_sharing_weights(ours)
    assert all(isinstance(processor, AttnProcessor2_0) for processor in baseline.attn_processors.values())
    assert benchmark.weight_bytes(ours, baseline) == benchmark.weight_bytes(ours)
    inputs = unet_inputs(stock)
    with torch.inference_mode():
        torch.testing.assert_close(baseline(**inputs).sample, stock(**inputs).sample, rtol=0, atol=0)


def test_baseline_vae_gets_back_the_default_layout(tiny_weights):

    benchmark = load_script("benchmark")
    stock = AutoencoderKL.from_pretrained(tiny_weights, subfolder="vae").eval()
    ours = AutoencoderKL.from_pretrained(tiny_weights, subfolder="vae").eval().to(memory_format=torch.channels_last)
    fuse_qkv_in_place(ours)
    baseline = benchmark.plain_copy_sharing_weights(ours)
    assert all(param.stride() == torch.empty(param.shape).stride() for param in baseline.parameters())
    latents = torch.randn(1, stock.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(baseline.decode(latents).sample, stock.decode(latents).sample, rtol=0, atol=0)


def test_baseline_loads_the_folders_lora_unfused_around_our_untouched_weights(pipeline, tiny_weights):
    benchmark = load_script("benchmark")
    lora = benchmark.baseline_lora(argparse.Namespace(no_baseline_lora=False, baseline_lora=None), tiny_weights)
    sdxl = benchmark.load_diffusers(tiny_weights, torch.device("cpu"), lora, ours=pipeline)
    adapted = [name for name, module in sdxl.unet.named_modules() if hasattr(module, "lora_A")]
    assert adapted and all(re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", name) for name in adapted)
    assert not any(hasattr(module, "lora_A") for module in pipeline.unet.modules())
    assert sdxl.unet.conv_in.weight.data_ptr() == pipeline.unet.conv_in.weight.data_ptr()
