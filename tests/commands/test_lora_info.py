"""scripts/lora-info: what a LoRA is and whether it would be applied, read against SDXL's architecture on the meta
device (or a weights folder's configs), through the same fetch and cache as a request."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from models.commands.lora_info import main
from models.weights.architecture import meta_models
from tests.support.loras import lora_file, trained_tokens, training_tar
from tests.support.writers import writers

ROOT = Path(__file__).resolve().parents[2]


def info(capsys, *flags: str) -> tuple[int, str]:
    status = main(list(flags))
    return status, capsys.readouterr().out


@pytest.fixture(scope="module")
def full_size_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("full-size")
    made = writers(meta_models())
    files = {}
    for name in ("kohya", "comfyui-lorasave"):
        written = made[name]()
        files[name] = folder / f"{name}.safetensors"
        save_file(written.tensors, files[name], written.header)
    return files


def test_a_full_size_kohya_lora_is_described_and_would_be_applied(capsys, tmp_path, full_size_files):
    status, out = info(capsys, str(full_size_files["kohya"]), "--json", "--cache", str(tmp_path))
    described = json.loads(out)
    assert status == 0 and described["applies"]
    assert described["naming"].startswith("kohya's names") and described["naming"].endswith("SGM block names")
    assert described["parts"] == {"UNet attention": 560, "UNet attention in/out projections": 22,
                                  "UNet feed-forward": 140, "text encoder 1": 72, "text encoder 2": 192}  # fmt: skip
    assert described["kinds"] == {"LoRA": 986} and described["ranks"] == [2]
    assert described["scales"] == [{"alpha": 1.0, "scale": 0.5}]
    sdxl = meta_models()
    weights = sum(
        module.weight.numel()
        for component, model in sdxl.items()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and (name.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")) or ".transformer_blocks." in name
             or name.endswith(("proj_in", "proj_out")))
    )  # fmt: skip
    assert described["copy_bytes"] == {"float32": 4 * weights, "16-bit": 2 * weights}


def test_comfyui_s_extraction_with_full_differences_is_described_in_lines(capsys, tmp_path, full_size_files):
    status, out = info(capsys, str(full_size_files["comfyui-lorasave"]), "--cache", str(tmp_path))
    lines = out.splitlines()
    assert status == 0 and lines[0] == "would be applied"
    assert lines[1].startswith("naming: ComfyUI's names")
    assert "UNet norms" in lines[2] and "UNet time and size embeddings 8" in lines[2]
    assert lines[3].startswith("kinds: LoRA ") and "full differences" in lines[3]
    assert "1 (no alpha)" in lines[4] and lines[5] == "trained tokens: none"


def test_a_training_s_tokens_are_listed(capsys, tmp_path, tiny_models, tiny_weights):
    tensors, header, _ = lora_file(tiny_models, "attention-processor")
    archive = tmp_path / "training.tar"
    archive.write_bytes(training_tar(save(tensors, header), trained_tokens((32, 32))))
    status, out = info(capsys, str(archive), "--weights", str(tiny_weights), "--cache", str(tmp_path / "cache"))
    assert status == 0
    assert "naming: attention processors under unet. (diffusers 0.19); diffusers block names" in out
    assert "trained tokens: 'TOK' -> <s0><s1>" in out


def test_a_lora_for_another_base_is_refused_in_one_line_with_status_2(capsys, tmp_path):
    path = tmp_path / "sd15.safetensors"
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 768), f"{key}.lora_up.weight": torch.zeros(768, 4)}, path)
    status, out = info(capsys, str(path), "--cache", str(tmp_path / "cache"))
    assert status == 2
    assert out == "would be refused: lora: an SD 1.x/2.x LoRA: none of its tensors fit an SDXL layer (such as" \
        f" {key}.lora_down.weight)\n"  # fmt: skip
    status, out = info(capsys, str(path), "--json", "--cache", str(tmp_path / "cache"))
    described = json.loads(out)
    assert status == 2 and not described["applies"] and described["refusal"].startswith("lora: an SD 1.x/2.x LoRA")


@pytest.mark.slow
def test_the_command_runs_as_a_script(tmp_path, full_size_files):
    finished = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "lora-info"), str(full_size_files["kohya"]), "--cache", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.startswith("would be applied\nnaming: kohya's names")
