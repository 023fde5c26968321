"""Fetched LoRAs on disk: an on-disk least-recently-used cache keyed by the source text."""

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator
from datetime import UTC, datetime
from pathlib import Path

from .. import settings
from .files import FileKind, file_kind
from .messages import human_size

log = logging.getLogger(__name__)

TOKENS_SUFFIX = ".tokens"
"""A training's new tokens are kept beside its LoRA as <key>.tokens (models/loras/tokens.py writes and reads it)."""

STALE_TEMPORARY_S = 3600
"""Age after which a *.tmp file in the cache is the leftover of a crashed download and is removed."""


def default_cache_folder() -> Path:
    """$LORA_CACHE, else a sibling of the weights folder: <MODEL_CACHE>.loras."""
    if folder := settings.folder(settings.LORA_CACHE):
        return folder
    weights = settings.model_cache().resolve()
    return weights.with_name(f"{weights.name}.loras")


def cache_key(text: str) -> str:
    """The cache key of a source: sha256 of its stripped text (tokens are no part of it)."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()


class LoraCache:
    """Fetched LoRAs on disk, `<key>.safetensors` each with a `<key>.json` note for people (and a `<key>.tokens`
    file for a training that brings new tokens), least recently used evicted first. An entry appears only by
    os.replace of a complete, checked file, so a crash leaves no complete-looking entry, only a *.tmp file that a
    later fetch removes."""

    def __init__(
        self, folder: Path | None = None, max_bytes: int | None = None, min_free_bytes: int | None = None
    ) -> None:
        self.folder = folder if folder is not None else default_cache_folder()
        self.max_bytes = max_bytes if max_bytes is not None else settings.byte_count(settings.LORA_CACHE_MAX)
        self.min_free_bytes = (
            min_free_bytes if min_free_bytes is not None else settings.byte_count(settings.LORA_CACHE_MIN_FREE)
        )

    def entry(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def lookup(self, key: str) -> Path | None:
        """The entry for a key, marked as just used; None when absent (or damaged, which is removed)."""
        path = self.entry(key)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        if file_kind(path) is not FileKind.SAFETENSORS:
            log.warning("LoRA cache: removing damaged entry %s", path.name)
            self.remove(path)
            return None
        return path

    @contextlib.contextmanager
    def temporary(self) -> Iterator[Path]:
        """A new empty *.tmp file in the cache folder for work in progress, removed unless moved into place."""
        self.folder.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(descriptor)
        path = Path(name)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def tokens(self, entry: Path) -> Path | None:
        """The `.tokens` file of a cache entry; None for a file outside the cache or an entry without tokens."""
        if entry.resolve().parent != self.folder.resolve():
            return None
        path = entry.with_suffix(TOKENS_SUFFIX)
        return path if path.is_file() else None

    def add(
        self, key: str, file: Path, description: str, in_use: Collection[Path] = (), tokens: Path | None = None
    ) -> Path:
        """Move a checked file (and its tokens, when it brings some) into place as the key's entry, then evict what
        the limits require. The tokens go first, so an entry never appears without them."""
        path = self.entry(key)
        if tokens is not None:
            os.replace(tokens, path.with_suffix(TOKENS_SUFFIX))
        else:
            path.with_suffix(TOKENS_SUFFIX).unlink(missing_ok=True)
        os.replace(file, path)
        note = {"source": description, "bytes": path.stat().st_size, "fetched_at": datetime.now(UTC).isoformat()}
        with self.temporary() as partial:
            partial.write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")
            os.replace(partial, path.with_suffix(".json"))
        self.remove_leftovers()
        self.evict(keep=[path, *in_use])
        return path

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)
        path.with_suffix(TOKENS_SUFFIX).unlink(missing_ok=True)

    def entries(self) -> list[tuple[Path, os.stat_result]]:
        """Every entry with its stat, least recently used first."""
        found = []
        for path in self.folder.glob("*.safetensors"):
            with contextlib.suppress(FileNotFoundError):
                found.append((path, path.stat()))
        return sorted(found, key=lambda item: item[1].st_mtime)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.folder).free

    def needs_room(self, total: int) -> bool:
        return total > self.max_bytes or self.free_bytes() < self.min_free_bytes

    def evict(self, keep: Collection[Path]) -> None:
        """Remove least recently used entries while the cache is over max_bytes or the disk under min_free_bytes,
        never one in keep; warn when the entries in keep alone break a limit."""
        kept = {Path(path).resolve() for path in keep}
        entries = self.entries()
        total = sum(stat.st_size for _, stat in entries)
        for path, stat in entries:
            if not self.needs_room(total):
                return
            if path.resolve() in kept:
                continue
            self.remove(path)
            total -= stat.st_size
            log.info("LoRA cache: evicted %s (%s)", path.name, human_size(stat.st_size))
        if self.needs_room(total):
            log.warning(
                "LoRA cache %s: %s of entries, %s free on the disk, beyond its limits (%s, at least %s free); kept the"
                " entries in use",
                self.folder,
                human_size(total),
                human_size(self.free_bytes()),
                human_size(self.max_bytes),
                human_size(self.min_free_bytes),
            )

    def remove_leftovers(self) -> None:
        """*.tmp files older than STALE_TEMPORARY_S (crashed downloads), and notes and tokens whose entry is gone."""
        now = time.time()
        for path in self.folder.glob("*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime > STALE_TEMPORARY_S:
                    path.unlink()
        for companion in [*self.folder.glob("*.json"), *self.folder.glob(f"*{TOKENS_SUFFIX}")]:
            if not companion.with_suffix(".safetensors").exists():
                companion.unlink(missing_ok=True)
