"""The manifest that says what a finished weights folder holds, and the checks against it.

`build.py` writes it when it finishes a folder; loading reads it and refuses a folder that does not match it.

Check policy: `check_against_manifest(hashes=False)` looks at the file list and every size (a stat per file), which
catches missing, truncated, unlisted and pickle files; with `hashes=True` it also hashes every byte (seconds for
SDXL's 7 GB: docs/WEIGHTS.md). download-weights hashes when it writes the folder and on every re-run; setup hashes
only when $VERIFY_WEIGHTS is set, so that a normal cold start does not pay those seconds again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ..errors import WeightsError
from .sources import DOWNLOAD_COMMAND, MODEL_COMPONENTS

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 2
"""2: the UNet as published and the Flash-SDXL LoRA file beside it, fused at load (1: the LoRA fused into the file)."""
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
HASH_CHUNK = 16 << 20


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What a finished weights folder holds: where it came from, and every file's size and sha256."""

    sources: dict[str, dict[str, Any]]
    dtype: str
    files: dict[str, FileRecord]
    lora: dict[str, Any] | None = None
    """The LoRA that loading fuses into the UNet: {"file": path in the folder, "scale": ...}; None for none."""
    format: int = MANIFEST_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {data.get('format')!r} is an older layout than this version's {MANIFEST_FORMAT}")
        files = {name: FileRecord(**record) for name, record in data.pop("files").items()}
        return cls(files=files, **data)

    def describe(self) -> str:
        """One line for the logs: each source at its commit, and the LoRA fused at load."""
        parts = [
            f"{source['repo']}@{str(source.get('commit') or source.get('revision'))[:10]}"
            if "repo" in source
            else f"{name} {source}"
            for name, source in self.sources.items()
        ]
        lora = f"LoRA {self.lora['file']} fused at load" if self.lora else "no LoRA"
        return f"{', '.join(parts)}; {lora}; {self.dtype}"


def manifest_path(folder: Path) -> Path:
    return folder / MANIFEST_NAME


def folder_files(folder: Path) -> list[str]:
    """Every file under the folder except the manifest, as sorted POSIX paths relative to it."""
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if (path.is_file() or path.is_symlink()) and path != manifest_path(folder)
    )


def pickle_files(names: Iterable[str]) -> list[str]:
    return [name for name in names if name.lower().endswith(PICKLE_SUFFIXES)]


def sha256_of(path: Path, progress: Callable[[int], object] | None = None) -> str:
    """The file's sha256, read in large chunks (hashlib releases the GIL, so files can hash in parallel)."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as file:
        while count := file.readinto(buffer):
            digest.update(view[:count])
            if progress is not None:
                progress(count)
    return digest.hexdigest()


def hash_files(folder: Path, names: list[str], progress: Callable[[int], object] | None = None) -> dict[str, str]:
    """sha256 of each named file, a few files at a time."""
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        digests = pool.map(lambda name: sha256_of(folder / name, progress), names)
        return dict(zip(names, digests, strict=True))


def weights_dtype(folder: Path, names: Iterable[str]) -> str:
    """The floating-point dtype of the tensors in the folder's safetensors files (read from their headers)."""
    dtypes: set[str] = set()
    for name in names:
        if name.endswith(".safetensors"):
            with safe_open(folder / name, framework="pt") as weights:
                dtypes |= {weights.get_slice(key).get_dtype() for key in weights.keys()}  # noqa: SIM118
    floats = sorted(FLOAT_DTYPES[dtype] for dtype in dtypes if dtype in FLOAT_DTYPES)
    return "+".join(floats) or "none"


def write_manifest(
    folder: Path,
    sources: dict[str, dict[str, Any]],
    lora: dict[str, Any] | None = None,
    progress: Callable[[int], object] | None = None,
) -> Manifest:
    """Hash every file of a finished folder and write manifest.json next to them.

    `lora` names the LoRA file that loading fuses into the UNet, and its scale; None means none. `dtype` is the four
    models' own (the LoRA and the safety checker, float32 as published, are loaded in their own way).
    Refuses a folder holding pickle files, so no manifest ever vouches for one.
    """
    names = folder_files(folder)
    pickles = pickle_files(names)
    if pickles:
        raise WeightsError(f"refusing to write a manifest for pickle files in {folder}: {', '.join(pickles)}")
    digests = hash_files(folder, names, progress)
    manifest = Manifest(
        sources=sources,
        lora=lora,
        dtype=weights_dtype(folder, [name for name in names if name.split("/")[0] in MODEL_COMPONENTS]),
        files={name: FileRecord(size=(folder / name).stat().st_size, sha256=digests[name]) for name in names},
    )
    partial = manifest_path(folder).with_suffix(".json.partial")
    partial.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(partial, manifest_path(folder))
    return manifest


def read_manifest(folder: Path) -> Manifest:
    """The folder's manifest, or a WeightsError saying how to get a folder that has one."""
    if not folder.is_dir():
        raise WeightsError(
            f"no model weights in {folder.resolve()}: run `{DOWNLOAD_COMMAND}` first"
            f" (`cog exec {DOWNLOAD_COMMAND}` in Cog), or set MODEL_CACHE to a folder it wrote"
        )
    try:
        return Manifest.from_json(manifest_path(folder).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(
            f"{folder.resolve()} has no {MANIFEST_NAME}, so it was not finished by scripts/download-weights:"
            f" run `{DOWNLOAD_COMMAND}` to rebuild it"
        ) from None
    except (ValueError, TypeError, KeyError) as error:
        raise WeightsError(
            f"{manifest_path(folder)} cannot be used ({error}): run `{DOWNLOAD_COMMAND}` to rebuild the folder"
        ) from None


def find_problems(
    folder: Path, manifest: Manifest, hashes: bool = False, progress: Callable[[int], object] | None = None
) -> list[str]:
    """What is wrong with a folder: pickle, unlisted, missing or resized files, and (with hashes) altered ones."""
    present = folder_files(folder)
    problems = [f"pickle file {name}" for name in pickle_files(present)]
    problems += [f"unlisted file {name}" for name in sorted(set(present) - set(manifest.files))]
    problems += [f"missing {name}" for name in sorted(set(manifest.files) - set(present))]
    for name in sorted(set(manifest.files) & set(present)):
        size, expected = (folder / name).stat().st_size, manifest.files[name].size
        if size != expected:
            problems.append(f"{name} has {size} bytes, not {expected}")
    if hashes and not problems:
        for name, digest in hash_files(folder, sorted(manifest.files), progress).items():
            if digest != manifest.files[name].sha256:
                problems.append(f"{name} has sha256 {digest[:12]}..., not {manifest.files[name].sha256[:12]}...")
    return problems


def summarize(problems: list[str], shown: int = 4) -> str:
    more = len(problems) - shown
    return "; ".join(problems[:shown]) + (f"; and {more} more" if more > 0 else "")


def check_against_manifest(
    folder: Path, hashes: bool = False, progress: Callable[[int], object] | None = None
) -> Manifest:
    """The folder's manifest, or one WeightsError listing what does not match it."""
    manifest = read_manifest(folder)
    problems = find_problems(folder, manifest, hashes, progress)
    if problems:
        raise WeightsError(
            f"{folder.resolve()} does not match its manifest ({summarize(problems)}):"
            f" run `{DOWNLOAD_COMMAND}` to repair it"
        )
    return manifest


def replace_folder(source: Path, target: Path) -> None:
    """Move a finished folder into place, replacing any existing one.

    A directory rename cannot overwrite a non-empty directory, so an old target is first renamed aside; at every
    moment the target is the old folder, absent, or the new complete one.
    """
    old = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f"{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old)
