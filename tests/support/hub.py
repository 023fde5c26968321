"""A local stand-in for the Hugging Face Hub: the repositories the weights are built from, as folders,
made from the tiny weights (with the decoy files download-weights must not take)."""

import fnmatch
import hashlib
import json
import shutil
from pathlib import Path

from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from models.accelerators import ACCELERATORS
from models.tooling.random_weights.build import LORA_LAYOUTS
from models.weights.build import Snapshot
from models.weights.sources import DEFAULT_SOURCES, PLACED_FILES, Source
from tests.support.loras import lora_tensors, random_lora

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


class FakeHub:
    """A local stand-in for the Hugging Face Hub: repositories as folders, fetched like snapshot_download does."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[str] = []

    def fetch(self, source: Source, downloads: Path) -> Snapshot:
        self.calls.append(source.repo)
        commit = hashlib.sha1(f"{source.repo}@{source.revision}".encode()).hexdigest()
        snapshot = downloads / source.repo / commit
        repo = self.root / source.repo
        for path in sorted(repo.rglob("*")):
            name = path.relative_to(repo).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(name, pattern) for pattern in source.files):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, snapshot / name)
        return Snapshot(snapshot, commit)


def write_file(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def build_hub(root: Path, tiny: Path) -> dict:
    """Repositories laid out like the real ones, with the files download-weights must not take as decoys."""
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
    for accelerator in ACCELERATORS.values():  # the same random LoRA in each accelerator's repository and layout
        repo = root / accelerator.repo
        repo.mkdir(parents=True)
        save_file(lora_tensors(lora, LORA_LAYOUTS[accelerator.name]), repo / accelerator.weight_name)
        write_file(repo / "README.md", accelerator.title)
    for name, files in PLACED_FILES.items():
        repo = root / DEFAULT_SOURCES.named()[name].repo
        for published, placed in files.items():
            write_file(repo / published, (tiny / placed).read_bytes())
        write_file(repo / "pytorch_model.bin", b"pickle")  # the older copy of the weights these repositories hold
    return lora
