"""New tokens a LoRA was trained with: their embeddings for both text encoders, the word in the prompt that calls them,
and their use for one request with an exact restore.

Two sources: a Replicate training's `.tar` (`embeddings.pti`, safetensors with `text_encoders_0` [n, 768] and
`text_encoders_1` [n, 1280], and `special_params.json`, `{"TOK": "<s0><s1>"}`), kept in the LoRA cache as a `.tokens`
file beside the LoRA; and OneTrainer's bundles inside the LoRA file (`bundle_emb.<placeholder>.clip_l` and `.clip_g`),
whose placeholder is the word. For a request the tokens are added to copies of both tokenizers, as Replicate's SDXL adds
them (added special tokens after the vocabulary), their embeddings after both text encoders' token tables
(`AddedTokens`), and the word is replaced by the tokens in the prompt, as its predictor does. The originals are put
back afterwards, so a request without the LoRA sees the model exactly as loaded.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..limits import MAX_NEW_TOKENS, MAX_TRAINING_WORDS_BYTES
from .header import LoraError, json_field
from .updates import finite

log = logging.getLogger(__name__)

BUNDLE_PREFIX = "bundle_emb."
BUNDLE_ENCODERS = {".clip_l": "clip_l", ".clip_g": "clip_g"}
"""OneTrainer's names for SDXL's two text encoders in a bundle key."""

MAX_TRIGGER_CHARS = 100


@dataclass(frozen=True)
class TokenSet:
    """New tokens and the word that calls them: the word is replaced by the tokens in the prompt."""

    trigger: str
    tokens: tuple[str, ...]
    clip_l: torch.Tensor
    """[len(tokens), the first text encoder's width]."""
    clip_g: torch.Tensor
    """[len(tokens), the second text encoder's width]."""


def token_set(trigger: Any, tokens: Iterable[str], clip_l: torch.Tensor, clip_g: torch.Tensor) -> TokenSet:
    """A token set from a file's fields, checked: a printable word, 1 to MAX_NEW_TOKENS finite 2-D embeddings."""
    if not isinstance(trigger, str) or not trigger.strip() or len(trigger) > MAX_TRIGGER_CHARS:
        raise LoraError(f"a trained token's word {str(trigger)[:40]!r} is not a word of at most {MAX_TRIGGER_CHARS}")
    if not trigger.isprintable():
        raise LoraError("a trained token's word holds control characters")
    tokens = tuple(tokens)
    for name, embeddings in (("clip_l", clip_l), ("clip_g", clip_g)):
        if embeddings.dim() != 2 or embeddings.shape[0] != len(tokens) or not 1 <= len(tokens) <= MAX_NEW_TOKENS:
            raise LoraError(
                f"the embeddings of {trigger!r} for {name} are {tuple(embeddings.shape)}; {len(tokens)} token(s) of at"
                f" most {MAX_NEW_TOKENS} were expected"
            )
        finite(f"the embeddings of {trigger!r} ({name})", embeddings)
    return TokenSet(trigger, tokens, clip_l.float(), clip_g.float())


def bundled_token_sets(file, keys: list[str]) -> list[TokenSet]:
    """OneTrainer's bundled embeddings in a LoRA file: one set per placeholder, both encoders' vectors required."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key in keys:
        if not key.startswith(BUNDLE_PREFIX):
            continue
        ending = next((ending for ending in BUNDLE_ENCODERS if key.endswith(ending)), None)
        if ending is None:
            raise LoraError(f"{key} bundles an embedding for another base model (SDXL's are clip_l and clip_g)")
        placeholder = key[len(BUNDLE_PREFIX) : -len(ending)]
        found.setdefault(placeholder, {})[BUNDLE_ENCODERS[ending]] = file.get_tensor(key)
    sets = []
    for placeholder, vectors in found.items():
        if set(vectors) != {"clip_l", "clip_g"}:
            raise LoraError(f"the bundled embedding {placeholder!r} lacks one of clip_l and clip_g")
        count = vectors["clip_l"].shape[0] if vectors["clip_l"].dim() == 2 else 0
        tokens = [f"<{placeholder}:{index}>" for index in range(count)]
        sets.append(token_set(placeholder, tokens, vectors["clip_l"], vectors["clip_g"]))
    return sets


def training_token_sets(embeddings: Path, special_params: bytes | None) -> list[TokenSet]:
    """A Replicate training's embeddings.pti (safetensors) and special_params.json, as token sets: each word maps to a
    run of its tokens <s0><s1>..., which must be the embeddings' rows, in order."""
    try:
        with safe_open(str(embeddings), framework="pt") as file:
            names = set(file.keys())
            if not {"text_encoders_0", "text_encoders_1"} <= names:
                raise LoraError("the training's embeddings.pti has no text_encoders_0 and text_encoders_1")
            clip_l, clip_g = file.get_tensor("text_encoders_0"), file.get_tensor("text_encoders_1")
    except (SafetensorError, OSError) as error:
        raise LoraError(f"the training's embeddings.pti is not readable ({str(error).splitlines()[0][:120]})") from None
    count = clip_l.shape[0] if clip_l.dim() == 2 else 0
    tokens = [f"<s{index}>" for index in range(count)]
    words = {"TOK": "".join(tokens)}
    if special_params is not None:
        if len(special_params) > MAX_TRAINING_WORDS_BYTES:
            raise LoraError("the training's special_params.json is larger than any training writes")
        words = json_field("special_params.json", special_params.decode("utf-8", errors="replace"))
        if not isinstance(words, dict) or not all(isinstance(value, str) for value in words.values()):
            raise LoraError("the training's special_params.json does not map words to tokens")
        if any(value != "".join(tokens) for value in words.values()):
            raise LoraError("the training's special_params.json names tokens its embeddings.pti does not hold")
    return [token_set(word, tokens, clip_l, clip_g) for word in words]


def write_tokens_file(path: Path, sets: list[TokenSet]) -> None:
    """The `.tokens` file the cache keeps beside a training's LoRA: every set's embeddings, and their words and tokens
    in the header (safetensors, like everything read here)."""
    tensors, words = {}, {}
    for index, entry in enumerate(sets):
        tensors[f"{index}.clip_l"], tensors[f"{index}.clip_g"] = entry.clip_l.contiguous(), entry.clip_g.contiguous()
        words[str(index)] = {"trigger": entry.trigger, "tokens": list(entry.tokens)}
    save_file(tensors, path, {"words": json.dumps(words)})


def read_tokens_file(path: Path | None) -> list[TokenSet]:
    """The token sets of a LoRA's `.tokens` file; none when there is no such file."""
    if path is None or not path.is_file():
        return []
    try:
        with safe_open(str(path), framework="pt") as file:
            words = json_field("words", (file.metadata() or {}).get("words"))
            if not isinstance(words, dict):
                raise LoraError("the trained tokens' file has no words")
            return [
                token_set(entry.get("trigger"), entry.get("tokens", []), file.get_tensor(f"{index}.clip_l"),
                          file.get_tensor(f"{index}.clip_g"))
                for index, entry in words.items()
            ]  # fmt: skip
    except (SafetensorError, OSError, AttributeError) as error:
        raise LoraError(f"its trained tokens' file is damaged ({str(error).splitlines()[0][:120]})") from None


class AddedTokens(nn.Module):
    """A text encoder's token embedding with new tokens after its vocabulary: ids below the vocabulary's size are
    looked up in the original table, the rest in the new rows. Selected, not copied: the original table is neither
    changed nor duplicated (SDXL's second one is 250 MB in float32)."""

    def __init__(self, table: nn.Embedding, rows: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.register_buffer("rows", rows.to(table.weight.device, table.weight.dtype), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vocabulary = self.table.num_embeddings
        known = self.table(ids.clamp(max=vocabulary - 1))
        added = F.embedding((ids - vocabulary).clamp(0, self.rows.shape[0] - 1), self.rows)
        return torch.where((ids >= vocabulary).unsqueeze(-1), added, known)


class TokenEmbeddings:
    """The pipeline's tokenizers and text encoders' token embeddings, with a request's new tokens added, and put back
    exactly: the originals are kept, and requests with new tokens use copies of the tokenizers and `AddedTokens`."""

    ENCODERS = (("tokenizer", "text_encoder", "clip_l"), ("tokenizer_2", "text_encoder_2", "clip_g"))

    def __init__(self, sdxl) -> None:
        self.sdxl = sdxl
        self.originals = {
            "tokenizer": sdxl.tokenizer,
            "tokenizer_2": sdxl.tokenizer_2,
            "text_encoder": sdxl.text_encoder.get_input_embeddings(),
            "text_encoder_2": sdxl.text_encoder_2.get_input_embeddings(),
        }
        self.words: dict[str, str] = {}
        self.applied: tuple = ()

    def restore(self) -> None:
        self.sdxl.tokenizer, self.sdxl.tokenizer_2 = self.originals["tokenizer"], self.originals["tokenizer_2"]
        self.sdxl.text_encoder.set_input_embeddings(self.originals["text_encoder"])
        self.sdxl.text_encoder_2.set_input_embeddings(self.originals["text_encoder_2"])
        self.words, self.applied = {}, ()

    @torch.no_grad()
    def apply(self, key: tuple, sets: list[TokenSet]) -> None:
        """Add these sets' tokens for the requests to come (until the next apply or restore); `key` names the set.
        A failure leaves the originals."""
        self.restore()
        if sets:
            try:
                self._add(sets)
            except BaseException:
                self.restore()
                raise
        self.applied = key

    def _add(self, sets: list[TokenSet]) -> None:
        tokens = [token for entry in sets for token in entry.tokens]
        if len(set(tokens)) != len(tokens) or len({entry.trigger for entry in sets}) != len(sets):
            raise LoraError("two LoRAs bring the same trained tokens or words; use one of them")
        for tokenizer_name, encoder_name, field in self.ENCODERS:
            table = self.originals[encoder_name]
            rows = torch.cat([getattr(entry, field) for entry in sets])
            if rows.shape[1] != table.embedding_dim:
                raise LoraError(
                    f"its trained tokens are {rows.shape[1]} wide for {encoder_name}, whose tokens are"
                    f" {table.embedding_dim}: they were trained for another base model"
                )
            tokenizer = copy.deepcopy(self.originals[tokenizer_name])
            if tokenizer.add_tokens(tokens, special_tokens=True) != len(tokens):
                raise LoraError(f"its trained tokens {', '.join(tokens)} include one SDXL's tokenizer already has")
            ids = tokenizer.convert_tokens_to_ids(tokens)
            if ids != list(range(table.num_embeddings, table.num_embeddings + len(tokens))):
                raise LoraError(f"{tokenizer_name} numbers new tokens from {ids[0]}, not after its vocabulary")
            setattr(self.sdxl, tokenizer_name, tokenizer)
            getattr(self.sdxl, encoder_name).set_input_embeddings(AddedTokens(table, rows))
        self.words = {entry.trigger: "".join(entry.tokens) for entry in sets}

    def rewrite(self, prompt: str) -> str:
        """The prompt with each word of the applied sets replaced by its tokens, as Replicate's SDXL does."""
        for word, tokens in self.words.items():
            prompt = prompt.replace(word, tokens)
        return prompt
