"""What a fetched file is, judged by its bytes alone, and the members of a Replicate training's .tar."""

import enum
import json
import logging
import shutil
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .. import limits
from ..errors import InputError
from ..limits import MAX_LORA_HEADER_BYTES, MAX_LORA_TENSORS
from .messages import human_size, listed, one_line, too_large

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
MAX_SAFETENSORS_HEADER_BYTES = 100_000_000
"""Largest JSON header a safetensors file may declare (the format's own limit)."""

TRAINING_LORA_NAME = "lora.safetensors"
TRAINING_EMBEDDINGS_NAME = "embeddings.pti"
TRAINING_WORDS_NAME = "special_params.json"

PICKLE_REFUSAL = (
    "this is a PyTorch pickle/checkpoint file, not safetensors; only .safetensors LoRAs are loaded (pickles can run"
    " code)"
)
NOT_A_LORA = "not a LoRA file (not safetensors or a .tar of a Replicate training)"


class FileKind(enum.Enum):
    SAFETENSORS = "safetensors"
    DAMAGED_SAFETENSORS = "damaged safetensors"
    TAR = "tar"
    PICKLE = "pickle"
    ZIP = "zip"
    OTHER = "other"


def safetensors_problem(path: Path) -> str | None:
    """What keeps a file from being a whole safetensors LoRA, or None when it is one.

    The layout: a little-endian u64 N, N bytes of UTF-8 JSON (a dict of tensors, each with its byte range), then
    the tensor bytes, which must end exactly where the file does. The header is read only within a LoRA's limits
    (MAX_LORA_HEADER_BYTES, MAX_LORA_TENSORS), so a hostile header costs a bounded parse.
    """
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            return "shorter than a safetensors header"
        (header_size,) = struct.unpack("<Q", prefix)
        if not 2 <= header_size <= MAX_SAFETENSORS_HEADER_BYTES:
            return f"implausible header size {header_size}"
        if header_size > MAX_LORA_HEADER_BYTES:
            limit = human_size(MAX_LORA_HEADER_BYTES)
            return f"its header is {human_size(header_size)}, more than the {limit} of a LoRA's"
        if 8 + header_size > size:
            return "the header runs past the end of the file, which is truncated"
        header_bytes = file.read(header_size)
    if not header_bytes.startswith(b"{"):
        return "the header is not a JSON object"
    if header_bytes.count(b'"data_offsets"') > MAX_LORA_TENSORS:  # before a parse whose memory grows with the count
        return f"it lists more than an SDXL LoRA's {MAX_LORA_TENSORS:,} tensors"
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (ValueError, RecursionError):
        return "the header is not valid safetensors JSON"
    entries = [entry for key, entry in header.items() if key != "__metadata__"]
    if len(entries) > MAX_LORA_TENSORS:
        return f"it lists {len(entries):,} tensors, more than an SDXL LoRA's {MAX_LORA_TENSORS:,}"
    ends = [
        offsets[1]
        for entry in entries
        if isinstance(entry, dict) and valid_offsets(offsets := entry.get("data_offsets"))
    ]
    if len(ends) != len(entries):
        return "the header is not valid safetensors JSON (a tensor without a byte range)"
    body = size - 8 - header_size
    end = max(ends, default=0)
    if end > body:
        return f"tensor data ends at byte {end} but the file has {body}, so it is truncated"
    if end < body:
        return f"{body - end} bytes after the last tensor"
    return None


def valid_offsets(offsets: object) -> bool:
    """A tensor's [start, end] byte range as the format has it: two whole numbers, in order."""
    return (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(offset, int) and not isinstance(offset, bool) for offset in offsets)
        and 0 <= offsets[0] <= offsets[1]
    )


def file_kind(path: Path) -> FileKind:
    """What a file is, judged by its bytes alone."""
    with path.open("rb") as file:
        head = file.read(512)
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= MAX_SAFETENSORS_HEADER_BYTES:
        return FileKind.DAMAGED_SAFETENSORS if safetensors_problem(path) else FileKind.SAFETENSORS
    if head[257:262] == b"ustar" or (head and tarfile.is_tarfile(path)):
        return FileKind.TAR
    if head[:1] == b"\x80":
        return FileKind.PICKLE
    if head[:4] == b"PK\x03\x04":
        return FileKind.ZIP
    return FileKind.OTHER


def require_safetensors(name: str, path: Path) -> None:
    kind = file_kind(path)
    if kind is FileKind.SAFETENSORS:
        return
    if kind is FileKind.DAMAGED_SAFETENSORS:
        raise InputError(f"{name}: not a usable safetensors LoRA ({safetensors_problem(path)}); check the source")
    if kind in (FileKind.PICKLE, FileKind.ZIP):
        raise InputError(f"{name}: {PICKLE_REFUSAL}")
    raise InputError(f"{name}: {NOT_A_LORA}")


@dataclass(frozen=True)
class TrainingMembers:
    """What is used of a Replicate training's .tar: its LoRA and, when present, its new tokens."""

    lora: tarfile.TarInfo
    embeddings: tarfile.TarInfo | None = None
    special_params: tarfile.TarInfo | None = None


def training_members(name: str, members: list[tarfile.TarInfo]) -> TrainingMembers:
    """The members of a Replicate training that are read: lora.safetensors (else the only .safetensors file),
    embeddings.pti and special_params.json. Only regular files count: links, devices and folders are skipped."""
    files = [member for member in members if member.isfile()]
    candidates = [member for member in files if member.name.lower().endswith(".safetensors")]
    named = [member for member in candidates if PurePosixPath(member.name).name == TRAINING_LORA_NAME]
    chosen = named or candidates
    if not chosen:
        raise InputError(f"{name}: the .tar has no .safetensors file, so it is not a Replicate LoRA training")
    if len(chosen) > 1:
        raise InputError(
            f"{name}: the .tar has several .safetensors files and no single {TRAINING_LORA_NAME}"
            f" ({listed([member.name for member in chosen])}); give the URL of one .safetensors file"
        )

    def single(file_name: str) -> tarfile.TarInfo | None:
        found = [member for member in files if PurePosixPath(member.name).name == file_name]
        return found[0] if len(found) == 1 else None

    return TrainingMembers(chosen[0], single(TRAINING_EMBEDDINGS_NAME), single(TRAINING_WORDS_NAME))


@dataclass(frozen=True)
class TrainingTokens:
    """A training's new tokens as extracted: its embeddings file (safetensors by content) and its words' JSON."""

    embeddings: Path
    special_params: bytes | None


def extract_training(name: str, archive: Path, lora: Path, embeddings: Path) -> TrainingTokens | None:
    """Copy a training .tar's LoRA into `lora` and its embeddings into `embeddings`, files of our choosing (never a
    path from the archive; nothing else is extracted). Returns its tokens, or None when it has none; an embeddings
    file that is a pickle is left out with a warning (pickles can run code)."""
    try:
        with tarfile.open(archive, "r:") as tar:
            members = training_members(name, tar.getmembers())
            copy_member(name, tar, members.lora, lora, limits.MAX_LORA_BYTES)
            if members.embeddings is None:
                return None
            copy_member(name, tar, members.embeddings, embeddings, limits.MAX_TRAINING_EMBEDDINGS_BYTES)
            if file_kind(embeddings) is not FileKind.SAFETENSORS:
                log.warning(
                    "%s: ignoring %s in the .tar: it is not safetensors, and pickles are not loaded; the LoRA is used"
                    " without its trained tokens",
                    name,
                    one_line(members.embeddings.name),
                )
                return None
            words = None
            if members.special_params is not None and members.special_params.size <= limits.MAX_TRAINING_WORDS_BYTES:
                source = tar.extractfile(members.special_params)
                words = source.read(limits.MAX_TRAINING_WORDS_BYTES + 1) if source is not None else None
            return TrainingTokens(embeddings, words)
    except (tarfile.TarError, EOFError) as error:
        raise InputError(
            f"{name}: the .tar is damaged or compressed ({one_line(str(error), 100)}); give a training's plain .tar"
        ) from None


def copy_member(name: str, tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, limit: int) -> None:
    if member.size > limit:
        raise too_large(name, member.size)
    source = tar.extractfile(member)
    if source is None:
        raise tarfile.ReadError(f"cannot read {member.name}")
    with source, target.open("wb") as out:
        shutil.copyfileobj(source, out, CHUNK_BYTES)
