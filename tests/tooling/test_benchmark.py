"""The benchmark (models/tooling/benchmark): its quick mode end to end, its server mode, and the plain-diffusers
baseline it compares with."""

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
from models.tooling.benchmark import run
from models.tooling.benchmark.baseline import baseline_lora, load_diffusers, plain_copy_sharing_weights
from models.tooling.benchmark.report import SERVER_TARGET
from models.tooling.cog_server import QuietHandler, RunningServer, serving_in_thread
from models.tooling.measuring import paired_speedups, weight_bytes
from models.weights.manifest import read_manifest
from tests.support.unet import unet_inputs

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
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


@pytest.mark.server
def test_server_mode_runs_the_predictor_through_cogs_server(tiny_weights, tmp_path):
    """--server: the same edit through Cog's HTTP server beside the in-process paths, with where its time went."""
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
    assert f"target: at most {SERVER_TARGET}x" in table and "| cog_outside_run | http_and_json |" in table


def test_server_mode_refuses_sizes_that_serving_resizes():
    with pytest.raises(SystemExit):
        run.parse_args(["--server", "--sizes", "1024,512"])


def test_stages_are_read_from_the_metrics_the_predictor_records_with_the_prediction(tmp_path):
    """The server's answer carries the service's timings as a metric: stages, the rest of the run, Cog's share."""
    answer = {
        "status": "succeeded",
        "output": [],
        "metrics": {"predict_time": 2.0, "timings": {"decode_inputs": 0.25, "denoise": 1.0, "total": 1.5}},
    }

    class FakeCog(QuietHandler):
        def do_GET(self) -> None:
            self.reply({"status": "READY"})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.reply(answer)

        def reply(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    image_path, map_path = run.make_inputs(tmp_path, 64, 64)
    values = run.edit_values(image_path, map_path, 1, 4, "png")
    with serving_in_thread(FakeCog) as url:
        stages = run.server_run(RunningServer(url, None, tmp_path / "log"), values)()
    assert {key: stages[key] for key in ("total", "decode_inputs", "denoise", "rest_of_run", "cog_outside_run")} == {
        "total": 2.0, "decode_inputs": 0.25, "denoise": 1.0, "rest_of_run": 0.25, "cog_outside_run": 0.5,
    }  # fmt: skip
    assert "http_and_json" in stages  # the client's wall time less predict_time


def test_paired_speedups_compare_the_runs_of_each_repeat():
    measured = {"ours": {"runs_s": [1.0, 2.0, 1.0]}, "diffusers": {"runs_s": [1.5, 1.0, 1.0]}}
    assert paired_speedups(measured) == [1.5, 0.5, 1.0]
    assert paired_speedups({**measured, "server": {"runs_s": [3.0, 1.0, 0.5]}}, "server") == [0.5, 1.0, 2.0]
    assert paired_speedups({"ours": {"runs_s": [1.0]}}) is None


def test_baseline_built_around_our_weights_is_stock_diffusers_with_the_same_output(tiny_weights):

    stock = UNet2DConditionModel.from_pretrained(tiny_weights, subfolder="unet").eval()
    ours = UNet2DConditionModel.from_pretrained(tiny_weights, subfolder="unet").eval()
    fuse_qkv_in_place(ours)
    baseline = plain_copy_sharing_weights(ours)
    assert all(isinstance(processor, AttnProcessor2_0) for processor in baseline.attn_processors.values())
    assert weight_bytes(ours, baseline) == weight_bytes(ours)
    inputs = unet_inputs(stock, side=8, timestep=499, seed=0)
    with torch.inference_mode():
        torch.testing.assert_close(baseline(**inputs).sample, stock(**inputs).sample, rtol=0, atol=0)


def test_baseline_vae_gets_back_the_default_layout(tiny_weights):

    stock = AutoencoderKL.from_pretrained(tiny_weights, subfolder="vae").eval()
    ours = AutoencoderKL.from_pretrained(tiny_weights, subfolder="vae").eval().to(memory_format=torch.channels_last)
    fuse_qkv_in_place(ours)
    baseline = plain_copy_sharing_weights(ours)
    assert all(param.stride() == torch.empty(param.shape).stride() for param in baseline.parameters())
    latents = torch.randn(1, stock.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(baseline.decode(latents).sample, stock.decode(latents).sample, rtol=0, atol=0)


def test_baseline_loads_the_folders_lora_unfused_around_our_untouched_weights(pipeline, tiny_weights):
    lora = baseline_lora(tiny_weights)
    sdxl = load_diffusers(tiny_weights, torch.device("cpu"), lora, ours=pipeline)
    adapted = [name for name, module in sdxl.unet.named_modules() if hasattr(module, "lora_A")]
    assert adapted and all(re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", name) for name in adapted)
    assert not any(hasattr(module, "lora_A") for module in pipeline.unet.modules())
    assert sdxl.unet.conv_in.weight.data_ptr() == pipeline.unet.conv_in.weight.data_ptr()


def test_the_benchmark_s_weights_carry_the_accelerator_asked_for(tmp_path):
    folder = run.ensure_weights(tmp_path / "bench", "tiny", "tcd")
    assert read_manifest(folder).lora["accelerator"] == "tcd"
    assert run.parse_args(["--accelerator", "lightning"]).accelerator == "lightning"
