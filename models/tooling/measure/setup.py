"""setup() against the time to read the same weight files from disk.

Without a folder it writes full-size random SDXL weights (~7 GB) to a temporary folder and deletes them afterwards.
"Cold" runs first evict the folder's own files from the page cache (posix_fadvise DONTNEED: nothing else is dropped);
"warm" runs follow a full read. Each setup runs in a fresh Python process (models/tooling/boot.py), and the
import time of the model code is reported apart from load_pipeline's. build=True also times the weights build
(models/weights/build.py) from the same files laid out as the Hub's repositories: what setup() does on a first boot,
except the download itself.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ...weights.build import SDXL_FILES_AS_IS, build_weights, fetch_from_folder
from ...weights.manifest import hash_files, read_manifest
from ...weights.sources import DEFAULT_SOURCES
from ..random_weights.build import write_test_weights
from .table import Table

ROOT = Path(__file__).resolve().parents[3]
CHUNK = 16 << 20
FULL_SIZE_BYTES = 7 * 10**9


def evict(paths: list[Path]) -> None:
    """Drop these files (only these) from the page cache, so that the next read comes from the disk."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def read_all(paths: list[Path]) -> float:
    """Seconds to read every byte of the files once, with plain reads."""
    buffer = bytearray(CHUNK)
    started = time.perf_counter()
    for path in paths:
        with path.open("rb", buffering=0) as file:
            while file.readinto(buffer):
                pass
    return time.perf_counter() - started


def setup_times(folder: Path, device: str, dtype: str) -> dict[str, float]:
    """Seconds of imports and of load_pipeline's stages, in a fresh process (its log lines go to stderr)."""
    result = subprocess.run(
        [sys.executable, "-m", "models.tooling.boot", str(folder), device, dtype],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def make_full_weights(scratch: Path) -> Path:
    free = shutil.disk_usage(scratch).free
    if free < 1.5 * FULL_SIZE_BYTES:
        raise OSError(f"{free / 1e9:.1f} GB free in {scratch}; full-size weights need about 7 GB")
    folder = scratch / "model-cache"
    write_test_weights(folder, "full")
    return folder


def hub_layout(folder: Path, root: Path) -> None:
    """The folder's files hard-linked under the names the Hub's repositories give them (fp16 variants and all)."""
    renamed = {ours: theirs for theirs, ours in SDXL_FILES_AS_IS.items()}
    manifest = read_manifest(folder)
    for name in manifest.files:
        if name.startswith("vae/"):
            target = root / DEFAULT_SOURCES.vae.repo / name.removeprefix("vae/")
        elif name == manifest.lora["file"]:
            target = root / DEFAULT_SOURCES.lora.repo / DEFAULT_SOURCES.lora_weight_name
        else:
            target = root / DEFAULT_SOURCES.sdxl.repo / renamed.get(name, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(folder / name, target)


def build_times(folder: Path, scratch: Path) -> dict[str, float]:
    """Seconds of each stage of a weights build from the folder's files: copying them in (where a download would
    land them), laying out the folder, and hashing it for the manifest."""
    root, dest = scratch / "hub", scratch / "built" / "model-cache"
    hub_layout(folder, root)
    started = time.perf_counter()
    build_weights(dest, fetcher=fetch_from_folder(root))
    seconds = {"build_s": time.perf_counter() - started}
    shutil.rmtree(scratch / "built")
    shutil.rmtree(root)
    return seconds


def measure_setup(
    folder: Path | None = None, device: str = "cpu", dtype: str = "float16", keep: bool = False, build: bool = False
) -> Table:
    """Reading, hashing and loading the folder's files, cold and warm; rows are printed as they are measured."""
    scratch = None if folder else Path(tempfile.mkdtemp(prefix="measure-setup-", dir=os.environ.get("TMPDIR")))
    try:
        folder = folder or make_full_weights(scratch)
        manifest = read_manifest(folder)
        paths = [folder / name for name in manifest.files]
        total = sum(record.size for record in manifest.files.values())
        table = Table(f"{folder}: {len(paths)} files, {total / 1e9:.2f} GB, loaded as {dtype} on {device}")

        def row(label: str, seconds: float, detail: str = "") -> None:
            table.add(label, f"{seconds:7.2f} s  {detail}".rstrip(), **{label: seconds})
            print(f"{label:<44} {table.rows[-1][1]}", flush=True)

        evict(paths)
        cold = read_all(paths)
        row("read every file once, cold", cold, f"{total / cold / 1e9:.2f} GB/s")
        warm = read_all(paths)
        row("read every file again, warm", warm, f"{total / warm / 1e9:.2f} GB/s")
        started = time.perf_counter()
        hash_files(folder, sorted(manifest.files))
        row("sha256 of every file, warm (VERIFY_WEIGHTS=1)", time.perf_counter() - started)
        evict(paths)
        for label in ("cold", "warm"):
            times = setup_times(folder, device, dtype)
            loading = times["total"] - times["speed_up"]
            row(f"setup {label}: load_pipeline", times["total"], f"(+ {times['import_s']:.2f} s of imports)")
            row(f"  of which loading the weights ({label})", loading, f"{total / loading / 1e9:.2f} GB/s")
            row(f"  of which fusing the LoRA ({label})", times["fuse_lora"])
            row(f"  of which speed_up ({label})", times["speed_up"])
        if build:
            logging.basicConfig(level=logging.INFO, format="    %(message)s", stream=sys.stderr)
            work = Path(tempfile.mkdtemp(prefix="measure-build-", dir=folder.parent))
            try:
                row("weights build from local snapshots (no download)", build_times(folder, work)["build_s"])
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return table
    finally:
        if scratch is not None and not keep:
            shutil.rmtree(scratch, ignore_errors=True)


def add_arguments(parser) -> None:
    parser.add_argument("dir", nargs="?", type=Path, help="a weights folder with a manifest (default: make one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="default: bf16 on CUDA, else fp16")
    parser.add_argument("--keep", action="store_true", help="keep the weights this made")
    parser.add_argument("--build", action="store_true", help="also time the weights build from these files")


def run(args) -> Table:
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float16")
    return measure_setup(args.dir, args.device, dtype, args.keep, args.build)
