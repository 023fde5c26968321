"""scripts/download-weights and the manifest, offline: a local "hub" built from tiny weights stands in for the
network step, and everything after it (fusing, layout, manifest, re-runs, refusals) runs for real."""

import copy
import fnmatch
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file, save_file

from models import loading
from models.errors import WeightsError
from models.loading import check_folder, load_pipeline
from models.weights import DEFAULT_SOURCES, MANIFEST_NAME, Source, check_against_manifest, read_manifest
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_RANK = 4
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
"""SDXL 1.0 base's published scheduler config (an Euler scheduler), which download-weights turns into LCM."""


download = load_script("download-weights")


def lora_targets(unet: torch.nn.Module) -> list[str]:
    """The attention projections Flash-SDXL trains (to_q, to_k, to_v, to_out.0 of every attention block)."""
    return [
        name
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS) and ".attn" in name
    ]


def random_lora(unet: torch.nn.Module, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(down, up) per target module, big enough to change the UNet's output clearly."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    lora = {}
    for name in lora_targets(unet):
        weight = modules[name].weight
        down = torch.randn(LORA_RANK, weight.shape[1], generator=generator) * 0.1
        up = torch.randn(weight.shape[0], LORA_RANK, generator=generator) * 0.1
        lora[name] = (down, up)
    return lora


def lora_tensors(lora: dict, style: str, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """The LoRA in one of the key styles diffusers reads; kohya files carry an alpha per layer."""
    tensors = {}
    for module, (down, up) in lora.items():
        if style == "peft":
            tensors |= {f"unet.{module}.lora_A.weight": down, f"unet.{module}.lora_B.weight": up}
        elif style == "diffusers":
            tensors |= {f"unet.{module}.lora.down.weight": down, f"unet.{module}.lora.up.weight": up}
        else:
            prefix = "lora_unet_" + module.replace(".", "_")
            tensors |= {f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up}
            tensors[f"{prefix}.alpha"] = torch.tensor(float(alpha if alpha is not None else LORA_RANK))
    return {key: value.contiguous() for key, value in tensors.items()}


def unet_inputs(unet: UNet2DConditionModel) -> dict:
    generator = torch.Generator().manual_seed(1)
    config = unet.config
    text_embeds_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {
        "sample": torch.randn(1, 4, 8, 8, generator=generator),
        "timestep": torch.tensor(759),
        "encoder_hidden_states": torch.randn(1, 77, config.cross_attention_dim, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(1, text_embeds_dim, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        },
    }


def run_unet(unet: UNet2DConditionModel) -> torch.Tensor:
    with torch.inference_mode():
        return unet(**unet_inputs(unet)).sample


def run_with_lora_hooks(unet: UNet2DConditionModel, lora: dict, scale: float) -> torch.Tensor:
    """The LoRA applied at run time, by hand: y = W x + b + scale * up(down(x)) on every target layer."""
    modules = dict(unet.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda module, args, output, down=down, up=up: output + scale * F.linear(F.linear(args[0], down), up)
        )
        for name, (down, up) in lora.items()
    ]
    try:
        return run_unet(unet)
    finally:
        for handle in handles:
            handle.remove()


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


class FakeHub:
    """A local stand-in for the Hugging Face Hub: repositories as folders, fetched like snapshot_download does."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[str] = []

    def fetch(self, source: Source, downloads: Path) -> "download.Snapshot":
        self.calls.append(source.repo)
        commit = hashlib.sha1(f"{source.repo}@{source.revision}".encode()).hexdigest()
        snapshot = downloads / source.repo / commit
        repo = self.root / source.repo
        for path in sorted(repo.rglob("*")):
            name = path.relative_to(repo).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(name, pattern) for pattern in source.files):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, snapshot / name)
        return download.Snapshot(snapshot, commit)


def write_file(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def build_hub(root: Path, tiny: Path) -> dict:
    """Repositories laid out like the real three, with the files download-weights must not take as decoys."""
    sdxl = root / DEFAULT_SOURCES.sdxl.repo
    index = json.loads((tiny / "model_index.json").read_text())
    index |= {"_class_name": "StableDiffusionXLPipeline", "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    for key in ("requires_aesthetics_score", "image_encoder", "feature_extractor"):
        index.pop(key)
    write_file(sdxl / "model_index.json", json.dumps(index))
    write_file(sdxl / "scheduler" / "scheduler_config.json", json.dumps(SDXL_SCHEDULER))
    for folder in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"):
        (sdxl / folder).mkdir(parents=True)
        for path in (tiny / folder).iterdir():
            if path.suffix == ".safetensors":  # the fp16 variant, as the real repository has it
                fp16 = {key: value.half() for key, value in load_file(path).items()}
                variant = path.name.replace(".safetensors", ".fp16.safetensors")
                save_file(fp16, sdxl / folder / variant, {"format": "pt"})
            else:
                write_file(sdxl / folder / path.name, path.read_bytes())
    unet_bytes = (tiny / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    decoys = {
        "unet/diffusion_pytorch_model.safetensors": unet_bytes,  # the fp32 copy
        "unet/diffusion_pytorch_model.bin": b"pickle",
        "sd_xl_base_1.0.safetensors": unet_bytes,  # the single-file checkpoint
        "text_encoder/model.onnx": b"onnx",
        "text_encoder/flax_model.msgpack": b"flax",
        "vae_decoder/model.onnx": b"onnx",
    }
    for name, data in decoys.items():
        write_file(sdxl / name, data)
    vae = root / DEFAULT_SOURCES.vae.repo
    for path in (tiny / "vae").iterdir():
        write_file(vae / path.name, path.read_bytes())
    write_file(vae / "diffusion_pytorch_model.bin", b"pickle")
    write_file(vae / "sdxl_vae.safetensors", (tiny / "vae" / "diffusion_pytorch_model.safetensors").read_bytes())
    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet")
    lora = random_lora(unet)
    lora_repo = root / DEFAULT_SOURCES.lora.repo
    lora_repo.mkdir(parents=True)
    save_file(lora_tensors(lora, "peft"), lora_repo / DEFAULT_SOURCES.lora_weight_name)
    write_file(lora_repo / "README.md", "Flash-SDXL")
    return lora


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_weights) -> FakeHub:
    root = tmp_path_factory.mktemp("hub")
    fake = FakeHub(root)
    fake.lora = build_hub(root, tiny_weights)
    fake.tiny = tiny_weights
    return fake


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory, hub) -> Path:
    """A weights folder written by download-weights from the fake hub (read-only: copy it to change it)."""
    dest = tmp_path_factory.mktemp("download") / "model-cache"
    assert download.download_weights(dest, fetcher=hub.fetch) is True
    return dest


@pytest.fixture
def weights_copy(downloaded, tmp_path) -> Path:
    dest = tmp_path / "model-cache"
    shutil.copytree(downloaded, dest)
    return dest


@pytest.mark.parametrize("style", ["peft", "diffusers", "kohya"])
def test_fused_lora_gives_the_unet_output_of_the_lora_applied_at_run_time(tiny_weights, tmp_path, style):
    unet = UNet2DConditionModel.from_pretrained(tiny_weights, subfolder="unet").eval()
    lora = random_lora(unet, seed=3)
    alpha = 2.0 * LORA_RANK if style == "kohya" else None  # kohya files carry alpha; the others mean alpha = rank
    save_file(lora_tensors(lora, style, alpha), tmp_path / "lora.safetensors")
    scale = 0.8 * (alpha / LORA_RANK if alpha else 1.0)

    base = run_unet(unet)
    expected = run_with_lora_hooks(unet, lora, scale)
    layers = download.read_lora(tmp_path, "lora.safetensors", dict(unet.config))
    fused_unet = copy.deepcopy(unet)
    download.fuse_lora(fused_unet, layers, scale=0.8)
    fused = run_unet(fused_unet)

    assert sorted(layer.module for layer in layers) == sorted(lora)
    assert (expected - base).abs().max() > 1e-2  # the LoRA matters...
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5)  # ...and fusing it changes nothing


def test_a_lora_that_does_not_fit_the_unet_is_refused(tiny_weights, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_weights, subfolder="unet")
    lora = random_lora(unet)
    module = next(iter(lora))
    lora[module.replace("attn1", "attn9")] = lora.pop(module)
    save_file(lora_tensors(lora, "peft"), tmp_path / "lora.safetensors")
    layers = download.read_lora(tmp_path, "lora.safetensors", dict(unet.config))
    with pytest.raises(download.DownloadError, match=r"attn9.*not a Linear"):
        download.fuse_lora(unet, layers, scale=1.0)


def test_download_writes_the_model_cache_layout_with_the_lora_fused(downloaded, hub):
    files = sorted(path.relative_to(downloaded).as_posix() for path in downloaded.rglob("*") if path.is_file())
    assert files == [
        "manifest.json",
        "model_index.json",
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
    assert manifest.fused and manifest.lora["layers"] == len(hub.lora) and manifest.lora["scale"] == 1.0
    assert manifest.dtype == "float16"
    assert manifest.sources["lora"]["repo"] == "jasperai/flash-sdxl"
    assert manifest.sources["sdxl"]["revision"] == DEFAULT_SOURCES.sdxl.revision
    assert len(manifest.sources["vae"]["commit"]) == 40
    assert not downloaded.with_name("model-cache.downloads").exists()  # the hub cache is cleaned up after success
    assert not list(downloaded.parent.glob("model-cache.tmp-*"))

    base = load_file(hub.root / DEFAULT_SOURCES.sdxl.repo / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    fused = load_file(downloaded / "unet" / "diffusion_pytorch_model.safetensors")
    for module, (down, up) in hub.lora.items():
        expected = (base[f"{module}.weight"].float() + up @ down).half()
        torch.testing.assert_close(fused[f"{module}.weight"], expected, rtol=0, atol=0)
    untouched = [key for key in base if not key.removesuffix(".weight").endswith(LORA_TARGETS)]
    assert all(torch.equal(fused[key], base[key]) for key in untouched)


def test_the_downloaded_layout_loads(downloaded):
    pipeline = load_pipeline(downloaded, torch.device("cpu"), torch.float32)
    assert pipeline.unet.dtype == torch.float32 and type(pipeline.scheduler).__name__ == "LCMScheduler"


def test_a_second_run_does_no_work(downloaded, hub):
    calls = len(hub.calls)
    started = time.perf_counter()
    assert download.download_weights(downloaded, fetcher=hub.fetch) is False
    assert time.perf_counter() - started < 5
    assert len(hub.calls) == calls


def test_a_corrupt_file_is_found_and_fetched_again(weights_copy, hub):
    unet_file = weights_copy / "unet" / "diffusion_pytorch_model.safetensors"
    flip_byte(unet_file)
    check_folder(weights_copy, hashes=False)  # setup's default check compares sizes only...
    with pytest.raises(WeightsError, match=r"unet/diffusion_pytorch_model\.safetensors has sha256"):
        check_folder(weights_copy, hashes=True)  # ...$VERIFY_WEIGHTS=1 and download-weights hash every byte

    calls = len(hub.calls)
    assert download.download_weights(weights_copy, fetcher=hub.fetch) is True
    assert len(hub.calls) == calls + 3
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

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "fuse_lora", interrupt)
    with pytest.raises(KeyboardInterrupt):
        download.download_weights(dest, fetcher=hub.fetch)
    assert not dest.exists()
    assert not list(tmp_path.glob("model-cache.tmp-*"))
    assert (tmp_path / "model-cache.downloads").is_dir()  # kept, so that the next run resumes

    monkeypatch.undo()
    stale = tmp_path / "model-cache.tmp-killed" / "model-cache"  # what a killed run leaves behind
    write_file(stale / MANIFEST_NAME, "{}")
    assert download.download_weights(dest, fetcher=hub.fetch) is True
    assert not stale.parent.exists()
    check_against_manifest(dest, hashes=True)


def test_an_interrupted_rebuild_keeps_the_old_folder(weights_copy, hub, monkeypatch):
    flip_byte(weights_copy / "model_index.json", offset=0)
    monkeypatch.setattr(download, "write_manifest", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        download.download_weights(weights_copy, fetcher=hub.fetch)
    assert (weights_copy / MANIFEST_NAME).is_file()  # the old (damaged) folder, still refused by its manifest
    with pytest.raises(WeightsError, match=r"model_index\.json has sha256"):
        check_against_manifest(weights_copy, hashes=True)


def test_revisions_are_pinnable_and_recorded(tmp_path, hub):
    args = download.parse_args(["--dest", str(tmp_path / "w"), "--lora-revision", "0123abc"])
    sources = DEFAULT_SOURCES.pinned(sdxl=args.sdxl_revision, vae=args.vae_revision, lora=args.lora_revision)
    assert sources.lora.revision == "0123abc" and sources.sdxl == DEFAULT_SOURCES.sdxl
    download.download_weights(tmp_path / "w", sources, fetcher=hub.fetch)
    assert read_manifest(tmp_path / "w").sources["lora"]["revision"] == "0123abc"
    calls = len(hub.calls)
    download.download_weights(tmp_path / "w", DEFAULT_SOURCES, fetcher=hub.fetch)  # other sources: a rebuild
    assert len(hub.calls) == calls + 3


def test_an_unreachable_hub_gets_one_clear_line(tmp_path, monkeypatch, capsys):
    def offline(source, downloads):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(download, "fetch", offline)
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
    with pytest.raises(download.DownloadError, match="is not a weights folder"):
        download.download_weights(dest, fetcher=hub.fetch)
    assert (dest / "holiday.jpg").read_bytes() == b"jpeg"


def test_loading_initialises_nothing_and_uses_the_target_dtype(downloaded, monkeypatch):
    """Components are built on the meta device; any initialiser that touches a real tensor would show here.

    speed_up() is left out: diffusers' fuse_qkv_projections builds its fused Linear layers with a (small) init.
    """
    monkeypatch.setattr(loading, "speed_up", lambda pipeline, compile_cache: None)
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


def test_serving_needs_no_peft(downloaded):
    """The serving image does not install peft (the benchmark's baseline alone uses it): loading works without it."""
    assert not any(line.startswith("peft") for line in (ROOT / "requirements.txt").read_text().splitlines())
    code = (
        "import sys; sys.modules['peft'] = None; "  # import peft fails and find_spec finds nothing, as if absent
        "import torch; from models.loading import load_pipeline; "
        f"load_pipeline({str(downloaded)!r}, torch.device('cpu'), torch.float32); "
        "print(sorted(name for name, module in sys.modules.items() if module and name.split('.')[0] == 'peft'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=300
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"
