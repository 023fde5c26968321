"""A LoRA source to a local safetensors file: from the cache, or fetched safely into it.

`fetch_lora` returns the path of a local file that is safetensors by its content (never judged by a name or an
extension); reading its tensors is `formats`' job.
"""

import logging
import time
from collections.abc import Collection
from pathlib import Path

from ..errors import InputError
from .cache import LoraCache, cache_key
from .client import (
    CIVITAI_TOKEN_INPUT,
    HF_TOKEN_INPUT,
    authorization_for,
    clean_token,
    download_deadline,
    download_hugging_face,
    download_url,
)
from .files import FileKind, extract_training, file_kind, require_safetensors
from .header import LoraError
from .messages import human_size
from .sources import HuggingFaceSource, LocalFile, UrlSource, decode_data_uri, parse_source
from .tokens import training_token_sets, write_tokens_file

log = logging.getLogger(__name__)


def fetch_lora(
    name: str,
    text: str | None,
    *,
    hf_token: str | None,
    civitai_token: str | None,
    cache: LoraCache,
    allow_paths: bool = False,
    in_use: Collection[Path] = (),
) -> Path | None:
    """The local safetensors file of a LoRA source, from the cache or fetched into it; None for an empty source.

    `in_use` names files that eviction must not remove, such as the other LoRA of the same request:
    `extra = fetch_lora("extra_lora", ..., in_use=[main])` after `main = fetch_lora("lora_weights", ...)`.
    """
    source = parse_source(name, text or "", allow_paths=allow_paths)
    if source is None:
        return None
    if isinstance(source, LocalFile):
        return local_lora(name, source, cache, in_use)
    key = cache_key(text or "")
    if (hit := cache.lookup(key)) is not None:
        log.info("%s: from the cache (%s, %s)", name, source.description, human_size(hit.stat().st_size))
        return hit
    hf_token = clean_token(HF_TOKEN_INPUT, hf_token)
    civitai_token = clean_token(CIVITAI_TOKEN_INPUT, civitai_token)
    started = time.monotonic()
    with cache.temporary() as download:
        if isinstance(source, UrlSource):
            authorization = authorization_for(source.url, hf_token, civitai_token)
            size = download_url(name, source.url, download, authorization, download_deadline())
        elif isinstance(source, HuggingFaceSource):
            size = download_hugging_face(name, source, download, hf_token, download_deadline())
        else:
            data = decode_data_uri(name, source.uri)
            download.write_bytes(data)
            size = len(data)
        path = add_lora(name, download, key, source.description, cache, in_use)
    log.info("%s: fetched %s (%s) in %.1fs", name, source.description, human_size(size), time.monotonic() - started)
    return path


def add_lora(name: str, file: Path, key: str, description: str, cache: LoraCache, in_use: Collection[Path]) -> Path:
    """Check a fetched file and move it into the cache: a safetensors file as it is, a training .tar as its LoRA."""
    if file_kind(file) is FileKind.TAR:
        return add_training_lora(name, file, key, description, cache, in_use)
    require_safetensors(name, file)
    return cache.add(key, file, description, in_use)


def add_training_lora(
    name: str, archive: Path, key: str, description: str, cache: LoraCache, in_use: Collection[Path]
) -> Path:
    """Cache the LoRA of a training .tar, and its new tokens beside it as a `.tokens` file (the archive itself is
    left where it is)."""
    with cache.temporary() as lora, cache.temporary() as embeddings, cache.temporary() as tokens:
        extracted = extract_training(name, archive, lora, embeddings)
        require_safetensors(name, lora)
        if extracted is not None:
            try:
                write_tokens_file(tokens, training_token_sets(extracted.embeddings, extracted.special_params))
            except LoraError as error:
                raise InputError(f"{name}: {error}") from None
        return cache.add(key, lora, description, in_use, tokens=tokens if extracted is not None else None)


def local_lora(name: str, source: LocalFile, cache: LoraCache, in_use: Collection[Path]) -> Path:
    """A local safetensors file is used where it lies; a local training .tar has its LoRA copied into the cache
    (afresh each time, since the file may have changed)."""
    if file_kind(source.path) is FileKind.TAR:
        key = cache_key(str(source.path.resolve()))
        return add_training_lora(name, source.path, key, source.description, cache, in_use)
    require_safetensors(name, source.path)
    log.info("%s: using the local file %s", name, source.path)
    return source.path
