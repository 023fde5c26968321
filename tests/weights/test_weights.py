"""The weights build (models/weights/build.py, scripts/download-weights) and the manifest, offline: a local "hub"
built from tiny weights stands in for the network step, and everything after it (layout, manifest, the fuse at
load, re-runs, refusals) runs for real."""

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file

from models.accelerators import ACCELERATORS
from models.commands import download_weights as download
from models.errors import InputError, WeightsError
from models.weights import build as weights_build
from models.weights import load as loading
from models.weights.build import DownloadError, build_weights
from models.weights.load import check_folder, load_pipeline
from models.weights.manifest import MANIFEST_NAME, check_against_manifest, read_manifest
from models.weights.sources import DEFAULT_SOURCES, PLACED_FILES

ROOT = Path(__file__).resolve().parents[2]


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def write_file(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory, hub) -> Path:
    """A weights folder written by download-weights from the fake hub (read-only: copy it to change it)."""
    dest = tmp_path_factory.mktemp("download") / "model-cache"
    assert build_weights(dest, fetcher=hub.fetch) is True
    return dest


@pytest.fixture
def weights_copy(downloaded, tmp_path) -> Path:
    dest = tmp_path / "model-cache"
    shutil.copytree(downloaded, dest)
    return dest


def test_the_build_writes_the_layout_with_the_published_files_unmodified(downloaded, hub):
    files = sorted(path.relative_to(downloaded).as_posix() for path in downloaded.rglob("*") if path.is_file())
    assert files == [
        "feature_extractor/preprocessor_config.json",
        "flash-lora/pytorch_lora_weights.safetensors",
        "manifest.json",
        *(f"map_depth/{n}" for n in ("config.json", "model.safetensors", "preprocessor_config.json")),
        *(f"map_segmentation/{n}" for n in sorted(
            ("config.json", "merges.txt", "model.safetensors", "preprocessor_config.json", "special_tokens_map.json",
             "tokenizer_config.json", "vocab.json")
        )),
        "model_index.json",
        "safety_checker/config.json",
        "safety_checker/model.safetensors",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors",
        *(f"{t}/{n}" for t in ("tokenizer", "tokenizer_2") for n in sorted(
            ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
        )),
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]  # fmt: skip
    index = json.loads((downloaded / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert index["scheduler"] == ["diffusers", "LCMScheduler"]
    scheduler = json.loads((downloaded / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler"
    assert scheduler["timestep_spacing"] == "trailing"
    assert scheduler["beta_schedule"] == "scaled_linear" and "skip_prk_steps" not in scheduler

    manifest = check_against_manifest(downloaded, hashes=True)
    assert manifest.lora == {"file": "flash-lora/pytorch_lora_weights.safetensors", "scale": 1.0}
    assert manifest.dtype == "float16"
    assert manifest.sources["lora"]["repo"] == "jasperai/flash-sdxl"
    assert manifest.sources["sdxl"]["revision"] == DEFAULT_SOURCES.sdxl.revision
    assert len(manifest.sources["vae"]["commit"]) == 40
    assert not downloaded.with_name("model-cache.downloads").exists()  # the hub cache is cleaned up after success
    assert not list(downloaded.parent.glob("model-cache.tmp-*"))

    # Byte for byte as published: the licence of Flash-SDXL allows sharing its file unmodified, not a fused UNet.
    sdxl, flash = hub.root / DEFAULT_SOURCES.sdxl.repo, hub.root / DEFAULT_SOURCES.lora.repo
    for published, ours in [
        (sdxl / "unet" / "diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors"),
        (sdxl / "text_encoder_2" / "model.fp16.safetensors", "text_encoder_2/model.safetensors"),
        (flash / DEFAULT_SOURCES.lora_weight_name, "flash-lora/pytorch_lora_weights.safetensors"),
    ]:
        assert (downloaded / ours).read_bytes() == published.read_bytes()
        assert manifest.files[ours].sha256 == hashlib.sha256(published.read_bytes()).hexdigest()


def test_loading_fuses_the_lora_rounding_once_to_the_target_dtype(downloaded, hub):
    base = load_file(hub.root / DEFAULT_SOURCES.sdxl.repo / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    for dtype in (torch.float32, torch.bfloat16):
        unet = dict(load_pipeline(downloaded, torch.device("cpu"), dtype).unet.named_modules())
        for module, (down, up) in hub.lora.items():
            expected = (base[f"{module}.weight"].float() + up @ down).to(dtype)
            torch.testing.assert_close(unet[module].weight, expected, rtol=0, atol=0)
        untouched = "down_blocks.0.resnets.0.conv1"
        assert torch.equal(unet[untouched].weight, base[f"{untouched}.weight"].to(dtype))


def test_the_downloaded_layout_loads(downloaded):
    pipeline = load_pipeline(downloaded, torch.device("cpu"), torch.float32)
    assert pipeline.unet.dtype == torch.float32 and type(pipeline.scheduler).__name__ == "LCMScheduler"


def test_a_second_run_does_no_work(downloaded, hub):
    calls = len(hub.calls)
    started = time.perf_counter()
    assert build_weights(downloaded, fetcher=hub.fetch) is False
    assert time.perf_counter() - started < 5
    assert len(hub.calls) == calls


def test_a_corrupt_file_is_found_and_fetched_again(weights_copy, hub):
    unet_file = weights_copy / "unet" / "diffusion_pytorch_model.safetensors"
    flip_byte(unet_file)
    check_folder(weights_copy, hashes=False)  # setup's default check compares sizes only...
    with pytest.raises(WeightsError, match=r"unet/diffusion_pytorch_model\.safetensors has sha256"):
        check_folder(weights_copy, hashes=True)  # ...$VERIFY_WEIGHTS=1 and download-weights hash every byte

    calls = len(hub.calls)
    assert build_weights(weights_copy, fetcher=hub.fetch) is True
    assert len(hub.calls) == calls + len(DEFAULT_SOURCES.named())  # every source fetched again
    check_against_manifest(weights_copy, hashes=True)


def test_verify_switch_makes_setup_hash(weights_copy, monkeypatch):
    flip_byte(weights_copy / "vae" / "diffusion_pytorch_model.safetensors")
    monkeypatch.setenv("VERIFY_WEIGHTS", "1")
    with pytest.raises(WeightsError, match=r"vae/diffusion_pytorch_model\.safetensors has sha256"):
        load_pipeline(weights_copy, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda folder: (folder / "text_encoder" / "model.safetensors").unlink(), "missing text_encoder/model"),
        (lambda folder: (folder / "tokenizer" / "vocab.json").write_text("{}"), "tokenizer/vocab.json has 2 bytes"),
        (lambda folder: write_file(folder / "unet" / "diffusion_pytorch_model.bin", b"x"), "pickle file unet/"),
        (lambda folder: write_file(folder / "unet" / "extra.safetensors", b"x"), "unlisted file unet/extra"),
        (lambda folder: (folder / MANIFEST_NAME).unlink(), "has no manifest.json"),
        (lambda folder: shutil.rmtree(folder), "run `python scripts/download-weights` first"),
    ],
    ids=["missing", "truncated", "pickle", "unlisted", "no-manifest", "no-folder"],
)
def test_loading_refuses_a_folder_that_fails_its_manifest(weights_copy, damage, message):
    damage(weights_copy)
    with pytest.raises(WeightsError, match=re.escape(message)) as refused:
        load_pipeline(weights_copy, torch.device("cpu"), torch.float32)
    assert "\n" not in str(refused.value) and "download-weights" in str(refused.value)


def test_an_interrupted_run_leaves_no_complete_looking_folder(tmp_path, hub, monkeypatch):
    dest = tmp_path / "model-cache"
    monkeypatch.setattr(weights_build, "write_scheduler", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_weights(dest, fetcher=hub.fetch)
    assert not dest.exists()
    assert not list(tmp_path.glob("model-cache.tmp-*"))
    assert (tmp_path / "model-cache.downloads").is_dir()  # kept, so that the next run resumes

    monkeypatch.undo()
    stale = tmp_path / "model-cache.tmp-killed" / "model-cache"  # what a killed run leaves behind
    write_file(stale / MANIFEST_NAME, "{}")
    assert build_weights(dest, fetcher=hub.fetch) is True
    assert not stale.parent.exists()
    check_against_manifest(dest, hashes=True)


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_an_interrupted_rebuild_keeps_the_old_folder(weights_copy, hub, monkeypatch):
    flip_byte(weights_copy / "model_index.json", offset=0)
    monkeypatch.setattr(
        weights_build, "write_manifest", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    with pytest.raises(KeyboardInterrupt):
        build_weights(weights_copy, fetcher=hub.fetch)
    assert (weights_copy / MANIFEST_NAME).is_file()  # the old (damaged) folder, still refused by its manifest
    with pytest.raises(WeightsError, match=r"model_index\.json has sha256"):
        check_against_manifest(weights_copy, hashes=True)


def test_revisions_are_pinnable_and_recorded(tmp_path, hub):
    args = download.parse_args(["--dest", str(tmp_path / "w"), "--lora-revision", "0123abc"])
    sources = DEFAULT_SOURCES.pinned(**{name: getattr(args, f"{name}_revision") for name in DEFAULT_SOURCES.named()})
    assert sources.lora.revision == "0123abc" and sources.sdxl == DEFAULT_SOURCES.sdxl
    build_weights(tmp_path / "w", sources, fetcher=hub.fetch)
    assert read_manifest(tmp_path / "w").sources["lora"]["revision"] == "0123abc"
    calls = len(hub.calls)
    build_weights(tmp_path / "w", DEFAULT_SOURCES, fetcher=hub.fetch)  # other sources: a rebuild
    assert len(hub.calls) == calls + len(DEFAULT_SOURCES.named())


def test_an_unreachable_hub_gets_one_clear_line(tmp_path, monkeypatch, capsys):
    def offline(source, downloads):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(weights_build, "fetch_from_hub", offline)
    assert download.main(["--dest", str(tmp_path / "w")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("download-weights: cannot reach the Hugging Face Hub for stabilityai/")
    assert "run again" in error and "\n" not in error
    assert not (tmp_path / "w").exists()


def test_check_flag_hashes_the_folder(weights_copy, capsys):
    assert download.main(["--dest", str(weights_copy), "--check"]) == 0
    flip_byte(weights_copy / "text_encoder_2" / "model.safetensors")
    assert download.main(["--dest", str(weights_copy), "--check"]) == 1
    assert "text_encoder_2/model.safetensors has sha256" in capsys.readouterr().err


def test_a_folder_that_is_not_a_weights_folder_is_never_replaced(tmp_path, hub):
    dest = tmp_path / "photos"
    write_file(dest / "holiday.jpg", b"jpeg")
    with pytest.raises(DownloadError, match="is not a weights folder"):
        build_weights(dest, fetcher=hub.fetch)
    assert (dest / "holiday.jpg").read_bytes() == b"jpeg"


def test_loading_initialises_nothing_and_uses_the_target_dtype(downloaded, monkeypatch):
    """Components are built on the meta device; any initialiser that touches a real tensor would show here.

    speed_up() is left out: diffusers' fuse_qkv_projections builds its fused Linear layers with a (small) init.
    """
    monkeypatch.setattr(loading, "speed_up", lambda pipeline: None)
    touched = []
    initialisers = [(torch.nn.init, name) for name in ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_")]
    for owner, name in [*initialisers, (torch.Tensor, "normal_"), (torch.Tensor, "uniform_")]:
        original = getattr(owner, name)

        def recording(tensor, *args, original=original, name=name, **kwargs):
            if tensor.device.type != "meta":
                touched.append(name)
            return original(tensor, *args, **kwargs)

        monkeypatch.setattr(owner, name, recording)
    pipeline = load_pipeline(downloaded, torch.device("cpu"), torch.bfloat16)
    assert touched == []
    for model in (pipeline.unet, pipeline.vae, pipeline.sdxl.text_encoder, pipeline.sdxl.text_encoder_2):
        assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}


@pytest.mark.slow
def test_serving_needs_no_peft(downloaded):
    """The serving image does not install peft (the benchmark's baseline alone uses it): loading works without it."""
    assert not any(line.startswith("peft") for line in (ROOT / "requirements.txt").read_text().splitlines())
    code = (
        "import sys; sys.modules['peft'] = None; "  # import peft fails and find_spec finds nothing, as if absent
        "import torch; from models.weights.load import load_pipeline; "
        f"load_pipeline({str(downloaded)!r}, torch.device('cpu'), torch.float32); "
        "print(sorted(name for name, module in sys.modules.items() if module and name.split('.')[0] == 'peft'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=300
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    ("lacking", "message"),
    [(("safety",), "safety checker"), (("segmentation", "depth"), "map_prompt's CLIPSeg")],
    ids=["safety-checker", "map-models"],
)
def test_a_folder_from_before_a_side_model_gains_it_by_fetching_only_that(tmp_path, hub, lacking, message):
    dest = tmp_path / "model-cache"
    build_weights(dest, dataclasses.replace(DEFAULT_SOURCES, **dict.fromkeys(lacking)), fetcher=hub.fetch)
    assert not set(lacking) & set(read_manifest(dest).sources)
    with pytest.raises(WeightsError, match=rf"has no {message} .*fetches only what the folder lacks"):
        load_pipeline(dest, torch.device("cpu"), torch.float32)
    unet = dest / "unet" / "diffusion_pytorch_model.safetensors"
    inode, calls = unet.stat().st_ino, len(hub.calls)

    assert build_weights(dest, fetcher=hub.fetch) is True
    assert hub.calls[calls:] == [DEFAULT_SOURCES.named()[name].repo for name in lacking]  # no 7 GB again
    assert unet.stat().st_ino == inode  # the rest of the folder untouched
    manifest = check_against_manifest(dest, hashes=True)
    for name in lacking:
        assert manifest.sources[name]["revision"] == DEFAULT_SOURCES.named()[name].revision
        assert set(PLACED_FILES[name].values()) <= set(manifest.files)
    loaded = load_pipeline(dest, torch.device("cpu"), torch.float32)
    assert loaded.safety is not None and loaded.segmenter is not None and loaded.depth is not None
    assert build_weights(dest, fetcher=hub.fetch) is False


@pytest.mark.parametrize("name", ["lightning", "tcd"])
def test_a_folder_built_with_another_accelerator_carries_its_lora_and_step_rule(tmp_path, hub, name, caplog):
    args = download.parse_args(["--dest", str(tmp_path / "w"), "--accelerator", name])
    assert args.accelerator == name
    accelerator = ACCELERATORS[name]
    build_weights(tmp_path / "w", DEFAULT_SOURCES.with_accelerator(name), fetcher=hub.fetch)
    manifest = check_against_manifest(tmp_path / "w", hashes=True)
    assert manifest.lora == {"file": f"{name}-lora/{accelerator.weight_name}", "scale": 1.0, "accelerator": name}
    assert manifest.sources["lora"]["repo"] == accelerator.repo
    assert not (tmp_path / "w" / "flash-lora").exists()
    with caplog.at_level(logging.INFO):
        loaded = load_pipeline(tmp_path / "w", torch.device("cpu"), torch.float32)
    assert loaded.accelerator is accelerator
    assert f"accelerator: {accelerator.title} ({accelerator.repo} at " in caplog.text
    assert accelerator.licence in caplog.text


def test_a_flash_folder_s_manifest_is_as_before_the_choice(downloaded):
    """Folders built before accelerators could be chosen have no accelerator in their LoRA record: still Flash."""
    assert "accelerator" not in read_manifest(downloaded).lora
    assert load_pipeline(downloaded, torch.device("cpu"), torch.float32).accelerator.name == "flash"


def test_another_accelerator_is_added_beside_the_first_and_chosen_at_load(tmp_path, hub, monkeypatch):
    """download-weights --accelerator tcd on a Flash folder fetches only TCD's LoRA; the folder keeps Flash as its
    default, and $ACCELERATOR (or load_pipeline's argument, scripts/edit --accelerator) picks among the two."""
    dest = tmp_path / "w"
    build_weights(dest, fetcher=hub.fetch)
    unet, calls = dest / "unet" / "diffusion_pytorch_model.safetensors", len(hub.calls)
    inode = unet.stat().st_ino
    assert build_weights(dest, DEFAULT_SOURCES.with_accelerator("tcd"), fetcher=hub.fetch) is True
    assert hub.calls[calls:] == [ACCELERATORS["tcd"].repo] and unet.stat().st_ino == inode
    manifest = check_against_manifest(dest, hashes=True)
    assert "accelerator" not in manifest.lora and manifest.sources["tcd"]["repo"] == ACCELERATORS["tcd"].repo
    assert build_weights(dest, fetcher=hub.fetch) is False  # the plain command keeps the extra LoRA
    assert build_weights(dest, DEFAULT_SOURCES.with_accelerator("tcd"), fetcher=hub.fetch) is False

    cpu = (torch.device("cpu"), torch.float32)
    assert load_pipeline(dest, *cpu).accelerator.name == "flash"
    assert load_pipeline(dest, *cpu, accelerator="tcd").accelerator.name == "tcd"
    monkeypatch.setenv("ACCELERATOR", "tcd")
    assert load_pipeline(dest, *cpu).accelerator.name == "tcd"
    with pytest.raises(WeightsError, match=r"has no SDXL-Lightning LoRA: run `.* --accelerator lightning`"):
        load_pipeline(dest, *cpu, accelerator="lightning")
    with pytest.raises(InputError, match="accelerator: must be one of flash, lightning, tcd, got 'turbo'"):
        load_pipeline(dest, *cpu, accelerator="turbo")
