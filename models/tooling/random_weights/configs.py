"""The random test weights' architecture: SDXL 1.0's components at full size or in miniature, and a tiny CLIP
tokenizer written in the real download's file layout."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import CLIPTokenizer

from ...weights import architecture

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# CLIP ViT-L's tokenizer pads with eos; OpenCLIP bigG's (tokenizer_2 in SDXL) pads with "!" (id 0).
TOKENIZER_PAD = EOS_TOKEN
TOKENIZER_2_PAD = "!"
# A few real CLIP merges, so that the BPE merge path runs; every result is in the vocab.
MERGES = ("t h", "i n", "a n", "e r", "o n", "th e</w>", "in g</w>", "an d</w>", "o f</w>")


@dataclass(frozen=True)
class Configs:
    """Constructor arguments of every component for one --size."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]


def byte_to_unicode() -> list[str]:
    """The 256 printable characters that byte-level BPE (GPT-2, CLIP) uses for bytes 0-255.

    Printable Latin-1 bytes map to themselves; the rest are shifted to 256+ so that every
    byte has a visible, non-whitespace character. Ordered like CLIP's vocab.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + shifted)
            shifted += 1
    return [chr(c) for c in chars]


def tiny_vocab() -> dict[str, int]:
    """CLIP-ordered vocab: bytes, bytes ending a word, merge results, then the special tokens.

    ``<|endoftext|>`` gets the highest id as in CLIP, so the text encoders' legacy argmax
    pooling and the eos-id pooling pick the same position.
    """
    chars = byte_to_unicode()
    tokens = [*chars, *(c + "</w>" for c in chars), *(m.replace(" ", "") for m in MERGES), BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def build_tokenizer(pad_token: str) -> CLIPTokenizer:
    """An in-memory CLIP tokenizer over the tiny vocab, padding and truncating to 77 tokens.

    model_max_length must be given: its default (~1e30) breaks padding to 77.
    """
    return CLIPTokenizer(
        vocab=tiny_vocab(),
        merges=[tuple(merge.split(" ")) for merge in MERGES],
        pad_token=pad_token,
        model_max_length=MODEL_MAX_LENGTH,
    )


def write_tokenizer_folder(folder: Path, pad_token: str) -> None:
    """Write a tokenizer folder with the files of the real SDXL download.

    That is vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json, with
    no tokenizer.json, so loading goes through the same vocab/merges path as the real one
    (transformers 5's save_pretrained would write only tokenizer.json).
    """
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    files = {
        "vocab.json": json.dumps(tiny_vocab(), ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(MERGES) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }
    for name, text in files.items():
        (folder / name).write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")


def text_encoder_config(size: str, vocab_size: int, *, big: bool) -> dict[str, Any]:
    """CLIPTextConfig arguments: CLIP ViT-L/14 (big=False) or OpenCLIP bigG/14 (big=True).

    Token ids follow the tiny tokenizer that is saved next to the encoders.
    """
    vocab = tiny_vocab()
    ids = {
        "bos_token_id": vocab[BOS_TOKEN],
        "eos_token_id": vocab[EOS_TOKEN],
        "pad_token_id": vocab["!"] if big else vocab[EOS_TOKEN],
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "vocab_size": vocab_size,
    }
    if size == "tiny":
        return {
            **ids,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "projection_dim": 32,
            "hidden_act": "gelu" if big else "quick_gelu",
        }
    return {**ids, **(architecture.CLIP_G if big else architecture.CLIP_L)}


def unet_config(size: str, cross_attention_dim: int, text_embeds_dim: int) -> dict[str, Any]:
    """UNet2DConditionModel arguments: SDXL 1.0 base, or a miniature with the same blocks.

    The miniature keeps SDXL's three levels and block types (attention only at the two coarser levels, several
    transformer layers at the coarsest): at 128x128 latents that runs faster than two levels with attention at 64x64.
    ``attention_head_dim`` is the number of heads in diffusers' naming (head size 16 here, 64 in SDXL). The added
    conditioning takes 6 time ids (original size, crop, target size) plus the pooled text embedding of text_encoder_2.
    """
    if size == "full":
        return dict(architecture.UNET)
    time_embed_dim = 8
    return {
        **architecture.UNET,
        "cross_attention_dim": cross_attention_dim,
        "block_out_channels": (32, 32, 64),
        "layers_per_block": 1,
        "transformer_layers_per_block": (1, 1, 2),
        "attention_head_dim": (2, 2, 4),
        "norm_num_groups": 8,
        "addition_time_embed_dim": time_embed_dim,
        "addition_embed_type_num_heads": 4,
        "projection_class_embeddings_input_dim": 6 * time_embed_dim + text_embeds_dim,
    }


def vae_config(size: str) -> dict[str, Any]:
    """AutoencoderKL arguments: the SDXL VAE (fp16-fix settings) or a 4-block miniature.

    Four blocks give the scale factor 8 the pipeline expects; fewer blocks make the latents, and the mid-block
    attention over them, far larger.
    """
    if size == "full":
        return dict(architecture.VAE)
    return {**architecture.VAE, "block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 4}


def component_configs(size: str, vocab_size: int) -> Configs:
    """All configs for one size; the UNet's dims follow from the text encoders'."""
    text_encoder = text_encoder_config(size, vocab_size, big=False)
    text_encoder_2 = text_encoder_config(size, vocab_size, big=True)
    cross_attention_dim = text_encoder["hidden_size"] + text_encoder_2["hidden_size"]
    return Configs(
        unet=unet_config(size, cross_attention_dim, text_encoder_2["projection_dim"]),
        vae=vae_config(size),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
    )


def check_tokenizers(folder: Path) -> None:
    """Fail unless both saved tokenizers load offline and turn any text into 77 known ids."""
    prompt = "A café at night, 夜のカフェ 🌃 " * 20
    vocab = tiny_vocab()
    for name, pad_token in (("tokenizer", TOKENIZER_PAD), ("tokenizer_2", TOKENIZER_2_PAD)):
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder=name, local_files_only=True)
        ids = tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length).input_ids
        short = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length).input_ids
        if (
            tokenizer.model_max_length != MODEL_MAX_LENGTH
            or len(ids) != MODEL_MAX_LENGTH
            or ids[0] != vocab[BOS_TOKEN]
            or ids[-1] != vocab[EOS_TOKEN]
            or short[2:] != [vocab[pad_token]] * (MODEL_MAX_LENGTH - 2)
            or tokenizer.unk_token_id in ids[1:-1]
        ):
            raise RuntimeError(f"{name} does not tokenize as expected: {ids} / {short}")


CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
SAFETY_VISION = {
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "image_size": 32, "patch_size": 8},
    "full": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
             "image_size": 224, "patch_size": 14},
}  # fmt: skip
"""The checker's CLIP vision tower: ViT-L/14 at full size, as CompVis's, and a miniature."""
NEVER_FLAGGED = 1.5
"""Concept thresholds above any cosine similarity: the random checker flags nothing (tests lower them to flag)."""

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

SEGMENTATION = {
    "tiny": {
        "text": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4},
        "vision": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "image_size": 32, "patch_size": 16},
        "model": {"projection_dim": 16, "reduce_dim": 16, "extract_layers": [1], "decoder_num_attention_heads": 2,
                  "decoder_intermediate_size": 32},
        "input_size": 64,
    },
    "full": {
        "text": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8},
        "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "image_size": 224, "patch_size": 16},
        "model": {"projection_dim": 512, "reduce_dim": 64, "extract_layers": [3, 6, 9],
                  "decoder_num_attention_heads": 4, "decoder_intermediate_size": 2048},
        "input_size": 352,
    },
}  # fmt: skip
"""CLIPSeg: rd64-refined's sizes at full size (its vision tower at 224 px, run at 352 with its position embeddings
interpolated, as the real processor does), and a miniature that runs the same path."""

DEPTH = {
    "tiny": {
        "backbone": {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 2,
                     "image_size": 28},
        "model": {"neck_hidden_sizes": [8, 16, 24, 24], "fusion_hidden_size": 16, "head_hidden_size": 8},
        "input_size": 56,
    },
    "full": {
        "backbone": {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 12, "num_attention_heads": 6,
                     "image_size": 518},
        "model": {"neck_hidden_sizes": [48, 96, 192, 384], "fusion_hidden_size": 64, "head_hidden_size": 32},
        "input_size": 518,
    },
}  # fmt: skip
"""Depth Anything V2 Small's sizes (a DINOv2 ViT-S/14 backbone and a DPT head), and a miniature."""
