"""setup() inside Cog's worker when the weights folder is missing: it builds it (here from $WEIGHTS_SNAPSHOTS, a
local stand-in for the Hub) and serves; an interrupted build is finished at the next boot; offline it fails with one
line naming the command to run."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.settings import WEIGHTS_SNAPSHOTS
from models.tooling.cog_server import data_uri, decode_output, predict, running_cog_server
from models.tooling.pictures import photo, png_bytes
from models.weights.build import build_weights, fetch_from_folder
from models.weights.load import load_pipeline
from models.weights.manifest import check_against_manifest
from models.weights.sources import DEFAULT_SOURCES, PLACED_FILES

pytestmark = pytest.mark.server


def edit_request() -> dict:
    change_map = np.zeros((48, 64), np.uint8)
    change_map[:, 32:] = 255
    return {"image": data_uri(png_bytes(photo(64, 48))), "map": data_uri(png_bytes(change_map)), "seed": 1}


def boot_log(log_path: Path) -> str:
    return log_path.read_text(encoding="utf-8", errors="replace")


def test_setup_builds_a_missing_folder_and_serves(hub, tmp_path):
    weights = tmp_path / "model-cache"
    log_path = tmp_path / "server.log"
    with running_cog_server(weights, log_path, env={WEIGHTS_SNAPSHOTS.name: str(hub.root)}) as server:
        result = predict(server.url, {**edit_request(), "output_format": "png"})
    assert result["status"] == "succeeded", result.get("error")
    assert decode_output(result["output"][0]).size == (64, 48)
    manifest = check_against_manifest(weights, hashes=True)
    assert manifest.sources["lora"]["commit"] == f"local:{DEFAULT_SOURCES.lora.revision}"
    log = boot_log(log_path)
    assert "building" in log and f"fetched {DEFAULT_SOURCES.sdxl.repo} at local:" in log and "wrote " in log
    assert f"fused {manifest.lora['file']}" in log and "setup took" in log


def test_an_interrupted_build_is_finished_at_the_next_boot(hub, tmp_path):
    """First boot: the LoRA's repository is missing, so the build stops after fetching SDXL and the VAE. Second
    boot: only the LoRA's and the side models' repositories are there; the build can succeed only by resuming
    from the first one's downloads."""
    weights = tmp_path / "model-cache"
    without_lora, only_lora = tmp_path / "hub-without-lora", tmp_path / "hub-only-lora"
    shutil.copytree(hub.root, without_lora, ignore=shutil.ignore_patterns("flash-sdxl"))
    for repo in [DEFAULT_SOURCES.lora.repo, *(DEFAULT_SOURCES.named()[name].repo for name in PLACED_FILES)]:
        shutil.copytree(hub.root / repo, only_lora / repo)

    first_log = tmp_path / "first.log"
    snapshots = {WEIGHTS_SNAPSHOTS.name: str(without_lora)}
    with running_cog_server(weights, first_log, snapshots, setup_may_fail=True) as server:
        assert server.status == "SETUP_FAILED"
    assert f"{DEFAULT_SOURCES.lora.repo} at revision main has no pytorch_lora_weights.safetensors" in boot_log(
        first_log
    )
    assert not weights.exists() and not list(tmp_path.glob("model-cache.tmp-*"))
    assert (tmp_path / "model-cache.downloads" / "local" / DEFAULT_SOURCES.sdxl.repo).is_dir()

    with running_cog_server(weights, tmp_path / "second.log", env={WEIGHTS_SNAPSHOTS.name: str(only_lora)}) as server:
        assert predict(server.url, edit_request())["status"] == "succeeded"
    assert (
        json.loads((weights / "manifest.json").read_text())["lora"]["file"]
        == "flash-lora/pytorch_lora_weights.safetensors"
    )
    assert not (tmp_path / "model-cache.downloads").exists()


def test_offline_without_weights_setup_fails_with_one_line_naming_the_command(tmp_path):
    log_path = tmp_path / "server.log"
    with running_cog_server(tmp_path / "model-cache", log_path, setup_may_fail=True) as server:
        assert server.status == "SETUP_FAILED"
    [line] = [line for line in boot_log(log_path).splitlines() if "no model weights in" in line]
    assert "python scripts/download-weights" in line


def test_a_damaged_folder_is_rebuilt_at_load(hub, tmp_path, monkeypatch):
    weights = tmp_path / "model-cache"
    build_weights(weights, fetcher=fetch_from_folder(hub.root))
    (weights / "vae" / "config.json").write_text("{}")
    monkeypatch.setenv(WEIGHTS_SNAPSHOTS.name, str(hub.root))
    load_pipeline(weights, torch.device("cpu"), torch.float32)
    check_against_manifest(weights, hashes=True)
    assert json.loads((weights / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderKL"
