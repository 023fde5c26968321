"""Where the weights come from: the Hugging Face repositories, their pinned revisions and the files taken from each,
and where each file goes in the weights folder."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..accelerators import ACCELERATORS, DEFAULT_ACCELERATOR

DOWNLOAD_COMMAND = "python scripts/download-weights"
LORA_WEIGHT_NAME = ACCELERATORS[DEFAULT_ACCELERATOR].weight_name


@dataclass(frozen=True)
class Source:
    """One Hugging Face repository at a revision (commit, tag or branch) and the files taken from it."""

    repo: str
    revision: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class Sources:
    """Everything the weights folder is built from."""

    sdxl: Source
    vae: Source
    lora: Source
    safety: Source | None = None
    segmentation: Source | None = None
    depth: Source | None = None
    lora_weight_name: str = LORA_WEIGHT_NAME
    lora_scale: float = 1.0
    accelerator: str = DEFAULT_ACCELERATOR
    """Which few-step LoRA `lora` is (models/accelerators.py): the folder's default, fused unless another is chosen."""
    extras: tuple[tuple[str, Source], ...] = ()
    """Other accelerators' LoRAs the folder holds beside it, by accelerator name."""

    def with_accelerator(self, name: str) -> Sources:
        """The same sources with another accelerator's LoRA, from its repository's main branch (resolved and
        recorded in the manifest; --lora-revision pins it)."""
        accelerator = ACCELERATORS[name]
        lora = Source(accelerator.repo, "main", (accelerator.weight_name,))
        return replace(self, lora=lora, lora_weight_name=accelerator.weight_name, accelerator=name)

    def pinned(self, **revisions: str | None) -> Sources:
        """The same sources with the given revisions (by source name: sdxl=..., safety=...) in place of the defaults."""
        return replace(
            self,
            **{
                name: replace(source, revision=revisions.get(name) or source.revision)
                for name, source in self.named().items()
            },
        )

    def named(self) -> dict[str, Source]:
        named = {"sdxl": self.sdxl, "vae": self.vae, "lora": self.lora}
        extras = {"safety": self.safety, "segmentation": self.segmentation, "depth": self.depth}
        return named | {name: source for name, source in extras.items() if source is not None} | dict(self.extras)


SDXL_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.fp16.safetensors",
    *(f"{tokenizer}/{name}" for tokenizer in ("tokenizer", "tokenizer_2") for name in (
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"
    )),
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
)  # fmt: skip
"""The fp16 variant of every component but the VAE: no fp32 or single-file UNet copy, no .bin/.onnx/.msgpack."""

MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
"""A transformers model's files: its config, its weights and its preprocessing."""
TOKENIZER_FILES = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")

DEFAULT_SOURCES = Sources(
    # A commit of the main branch that many projects pin; --sdxl-revision main takes the newest.
    sdxl=Source("stabilityai/stable-diffusion-xl-base-1.0", "462165984030d82259a11f4367a4eed129e94a7b", SDXL_FILES),
    # The fp16-safe VAE (runs in fp16 and bf16 without NaNs), at a commit many projects pin.
    vae=Source(
        "madebyollin/sdxl-vae-fp16-fix",
        "207b116dae70ace3637169f1ddd2434b91b3a8cd",
        ("config.json", "diffusion_pytorch_model.safetensors"),
    ),
    # No commit pinned yet: "main" is resolved at download time and the commit is recorded in the manifest;
    # copy it here (or pass --lora-revision) to pin it.
    lora=Source("jasperai/flash-sdxl", "main", (LORA_WEIGHT_NAME,)),
    # The CompVis safety checker Replicate's SDXL uses, at the pull request that added its safetensors weights
    # (the main branch long held only pytorch_model.bin); the resolved commit is recorded in the manifest.
    safety=Source(
        "CompVis/stable-diffusion-safety-checker",
        "refs/pr/41",
        ("config.json", "model.safetensors", "preprocessor_config.json"),
    ),
    # CLIPSeg for map_prompt (Apache-2.0). Its main branch holds only pytorch_model.bin; its safetensors weights are
    # on a pull request of the repo. Which one could not be checked from here (no network): a revision without
    # them fails the build with one line naming --segmentation-revision. The resolved commit is recorded.
    segmentation=Source("CIDAS/clipseg-rd64-refined", "refs/pr/1", (*MODEL_FILES, *TOKENIZER_FILES)),
    # Depth Anything V2 Small for map_depth (Apache-2.0; its Base and Large checkpoints are CC BY-NC 4.0): "main" is
    # resolved at download time and recorded in the manifest.
    depth=Source("depth-anything/Depth-Anything-V2-Small-hf", "main", MODEL_FILES),
)

MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
"""The folders whose tensors' dtype the manifest records: the ones loading reads in that dtype."""

SAFETY_FILES = {
    "config.json": "safety_checker/config.json",
    "model.safetensors": "safety_checker/model.safetensors",
    "preprocessor_config.json": "feature_extractor/preprocessor_config.json",
}
"""Where the safety checker's files go in the weights folder: diffusers' names for a pipeline's checker."""

SEGMENTATION_FOLDER, DEPTH_FOLDER = "map_segmentation", "map_depth"

PLACED_FILES = {
    "safety": SAFETY_FILES,
    "segmentation": {name: f"{SEGMENTATION_FOLDER}/{name}" for name in (*MODEL_FILES, *TOKENIZER_FILES)},
    "depth": {name: f"{DEPTH_FOLDER}/{name}" for name in MODEL_FILES},
}
"""The models beside the pipeline, by source name, and where each published file goes. Each is a few files of its
own that nothing else depends on, so a folder built without one gains it in place (stored as published, float32)."""


def placed_files(name: str) -> dict[str, str]:
    """Where a source that a folder can gain in place puts its files: a model beside the pipeline, or another
    accelerator's LoRA (in its own folder, unmodified)."""
    if name in PLACED_FILES:
        return PLACED_FILES[name]
    accelerator = ACCELERATORS[name]
    return {accelerator.weight_name: f"{accelerator.folder}/{accelerator.weight_name}"}


ADDABLE = {*PLACED_FILES, *ACCELERATORS}
"""The sources a complete folder can gain in place, fetching only them."""

PLACED_NAMES = {
    "safety": "safety checker",
    "segmentation": "map_prompt's CLIPSeg",
    "depth": "map_depth's Depth Anything",
}
