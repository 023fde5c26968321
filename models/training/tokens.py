"""The token's new embeddings, trained beside the LoRA (pivotal tuning, as Replicate's SDXL trainer does), and the
two files that carry them: embeddings.pti and special_params.json, which models/loras/tokens.py reads back."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..loras.tokens import TokenEmbeddings, token_set

NEW_TOKENS = ("<s0>", "<s1>")
"""Replicate's SDXL trainings add two tokens for the word; a prompt that says the word calls both."""


def add_trainable_tokens(sdxl, word: str, generator: torch.Generator) -> tuple[TokenEmbeddings, list[nn.Parameter]]:
    """Add the new tokens to both tokenizers and text encoders (models/loras/tokens.py's `AddedTokens`, the original
    tables untouched), their rows drawn with the spread of each table's own embeddings, and made trainable."""
    rows = []
    for encoder in (sdxl.text_encoder, sdxl.text_encoder_2):
        table = encoder.get_input_embeddings().weight
        start = torch.randn(len(NEW_TOKENS), table.shape[1], generator=generator) * table.float().std().item()
        rows.append(start)
    embeddings = TokenEmbeddings(sdxl)
    embeddings.apply(("training", word), [token_set(word, NEW_TOKENS, rows[0], rows[1])])
    parameters = []
    for encoder in (sdxl.text_encoder, sdxl.text_encoder_2):
        added = encoder.get_input_embeddings()
        parameter = nn.Parameter(added.rows.detach().float().clone())
        del added.rows  # a buffer until now: the trainable copy takes its place
        added.rows = parameter
        parameters.append(parameter)
    return embeddings, parameters


def write_token_files(folder: Path, word: str, rows: list[torch.Tensor]) -> list[Path]:
    """embeddings.pti (safetensors: text_encoders_0 [2, 768], text_encoders_1 [2, 1280]) and special_params.json
    ({word: "<s0><s1>"}), as Replicate's trainings write them."""
    embeddings, words = folder / "embeddings.pti", folder / "special_params.json"
    tensors = {
        f"text_encoders_{index}": row.detach().to("cpu", torch.float32).contiguous() for index, row in enumerate(rows)
    }
    save_file(tensors, embeddings)
    words.write_text(json.dumps({word: "".join(NEW_TOKENS)}), encoding="utf-8")
    return [embeddings, words]
