"""Building the weights folder: fetch SDXL 1.0 base (fp16), the fp16-fix VAE and the Flash-SDXL LoRA, lay them out as
a diffusers img2img pipeline folder and write its manifest.

One implementation for `scripts/download-weights` and for `setup()` when the folder is missing or damaged.

The UNet, the text encoders, the tokenizers and the LoRA file are taken byte for byte (hard-linked from the download
cache where the disk allows, so the folder costs no second 7 GB); only the VAE is rewritten, in float16. The LoRA is
fused into the UNet when the folder is loaded, not here: Flash-SDXL's licence (CC BY-NC-ND 4.0) lets its file be
shared unmodified, and a published image that carried a UNet with it fused in would share an adaptation.

Safe to interrupt: downloads go to a hub cache next to the folder (`<folder>.downloads`) and stay there until the
folder is finished, so the next run resumes; the folder is built in a temporary sibling and renamed into place last,
so an interrupted run never leaves a complete-looking folder.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, LCMScheduler
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    XetDownloadError,
)
from huggingface_hub.utils import tqdm

from .. import settings
from ..accelerators import ACCELERATORS, DEFAULT_ACCELERATOR
from ..errors import DownloadError, WeightsError
from .manifest import (
    MANIFEST_NAME,
    FileRecord,
    find_problems,
    hash_files,
    manifest_path,
    read_manifest,
    replace_folder,
    summarize,
    write_manifest,
)
from .sources import ADDABLE, DEFAULT_SOURCES, Source, Sources, placed_files

log = logging.getLogger(__name__)

WEIGHT_DTYPE = torch.float16

SDXL_FILES_AS_IS = {
    "text_encoder/config.json": "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors": "text_encoder/model.safetensors",
    "text_encoder_2/config.json": "text_encoder_2/config.json",
    "text_encoder_2/model.fp16.safetensors": "text_encoder_2/model.safetensors",
    "unet/config.json": "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors": "unet/diffusion_pytorch_model.safetensors",
    **{
        f"{tokenizer}/{name}": f"{tokenizer}/{name}"
        for tokenizer in ("tokenizer", "tokenizer_2")
        for name in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
    },
}
"""Files taken byte for byte, under the standard (non-variant) names that from_pretrained looks for."""


@dataclass(frozen=True)
class Snapshot:
    """One repository's fetched files, and the commit they came from."""

    folder: Path
    commit: str


Fetcher = Callable[[Source, Path], Snapshot]


def fetch_from_hub(source: Source, downloads: Path) -> Snapshot:
    """The only network step: a repository's listed files at a revision, into a resumable hub cache."""
    folder = Path(
        snapshot_download(source.repo, revision=source.revision, allow_patterns=list(source.files), cache_dir=downloads)
    )
    return Snapshot(folder, commit=folder.name)  # the hub cache names each snapshot folder after its commit


def fetch_from_folder(root: Path) -> Fetcher:
    """A fetcher reading `root/<owner>/<name>/`, copying into the download cache as the hub does (and resuming:
    a file already there with the same size is not copied again)."""

    def fetch(source: Source, downloads: Path) -> Snapshot:
        snapshot = downloads / "local" / source.repo
        for name in source.files:
            origin, target = root / source.repo / name, snapshot / name
            if target.is_file() and origin.is_file() and target.stat().st_size == origin.stat().st_size:
                continue
            if not origin.is_file():
                continue  # reported as missing by fetch_all, as for the hub
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            shutil.copyfile(origin, partial)
            os.replace(partial, target)
        return Snapshot(snapshot, commit=f"local:{source.revision}")

    return fetch


def default_fetcher() -> Fetcher:
    """The Hub, or the folder named by $WEIGHTS_SNAPSHOTS."""
    root = settings.folder(settings.WEIGHTS_SNAPSHOTS)
    return fetch_from_folder(root) if root else fetch_from_hub


def fetch_all(named: dict[str, Source], downloads: Path, fetcher: Fetcher) -> dict[str, Snapshot]:
    """Fetch every source, logging each one's commit and time, turning hub failures into one line that says what
    to do."""
    snapshots = {}
    for name, source in named.items():
        where = f"{source.repo} at revision {source.revision}"
        kept = f"files already fetched are kept in {downloads}"
        started = time.perf_counter()
        try:
            snapshot = fetcher(source, downloads)
        except RevisionNotFoundError:
            raise DownloadError(
                f"{source.repo} has no revision {source.revision!r}: pass an existing commit, tag or branch"
                f" with --{name}-revision"
            ) from None
        except GatedRepoError:
            raise DownloadError(
                f"{source.repo} is gated: accept its terms on https://huggingface.co/{source.repo}, log in"
                " (`hf auth login` or HF_TOKEN) and run again"
            ) from None
        except RepositoryNotFoundError:
            raise DownloadError(
                f"{source.repo} was not found on the Hugging Face Hub (or is private): check the repository in"
                " models/weights/sources.py, or log in (`hf auth login` or HF_TOKEN) if it is private"
            ) from None
        except LocalEntryNotFoundError:
            raise DownloadError(
                f"cannot reach the Hugging Face Hub for {where}: check the network, proxy and HF_ENDPOINT"
                f" (and that HF_HUB_OFFLINE is not set), then run again; {kept}"
            ) from None
        except (HfHubHTTPError, HTTPError, XetDownloadError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DownloadError(f"downloading {where} failed ({reason}): run again to resume; {kept}") from None
        missing = [file for file in source.files if not (snapshot.folder / file).is_file()]
        if missing:
            raise DownloadError(
                f"{where} has no {', '.join(missing)}: pick a revision that has them with --{name}-revision"
            )
        log.info("fetched %s at %s in %.1fs", source.repo, snapshot.commit, time.perf_counter() - started)
        snapshots[name] = snapshot
    return snapshots


def link_or_copy(origin: Path, target: Path) -> None:
    """Hard-link a fetched file into the folder (no second copy on disk); copy it across file systems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(origin.resolve(), target)
    except OSError:
        shutil.copyfile(origin, target)


def write_model_index(source: Path, target: Path) -> None:
    """SDXL's model index, made to describe the img2img pipeline with an LCM scheduler."""
    index = json.loads(source.read_text(encoding="utf-8"))
    index.update(
        {
            "_class_name": "StableDiffusionXLImg2ImgPipeline",
            "requires_aesthetics_score": False,
            "force_zeros_for_empty_prompt": True,
            "scheduler": ["diffusers", "LCMScheduler"],
        }
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_scheduler(source: Path, target: Path) -> None:
    """LCMScheduler with SDXL's noise schedule and trailing timesteps, the setting Flash-SDXL is trained for."""
    config = json.loads(source.read_text(encoding="utf-8"))
    accepted = inspect.signature(LCMScheduler.__init__).parameters
    settings = {key: value for key, value in config.items() if key in accepted}
    LCMScheduler.from_config({**settings, "timestep_spacing": "trailing"}).save_pretrained(target)


def lora_record(sources: Sources) -> dict[str, Any]:
    """The manifest's note of the LoRA that loading fuses, at which scale, and which accelerator it is (left out for
    Flash-SDXL, the default, as folders from before the choice have it)."""
    accelerator = ACCELERATORS[sources.accelerator]
    record = {"file": f"{accelerator.folder}/{sources.lora_weight_name}", "scale": sources.lora_scale}
    return record | ({"accelerator": accelerator.name} if accelerator.name != DEFAULT_ACCELERATOR else {})


def place_model(out: Path, name: str, snapshot: Snapshot) -> list[str]:
    """A source the folder can gain in place (the safety checker, the map models, another accelerator's LoRA), its
    files as published; returns their paths in the folder."""
    for published, placed in placed_files(name).items():
        link_or_copy(snapshot.folder / published, out / placed)
    return list(placed_files(name).values())


def build_folder(out: Path, snapshots: dict[str, Snapshot], sources: Sources) -> None:
    """Write the weights folder's layout from the fetched files."""
    for name in ADDABLE & snapshots.keys():
        place_model(out, name, snapshots[name])
    sdxl = snapshots["sdxl"].folder
    for source_name, target_name in SDXL_FILES_AS_IS.items():
        link_or_copy(sdxl / source_name, out / target_name)
    link_or_copy(snapshots["lora"].folder / sources.lora_weight_name, out / lora_record(sources)["file"])
    write_model_index(sdxl / "model_index.json", out / "model_index.json")
    write_scheduler(sdxl / "scheduler" / "scheduler_config.json", out / "scheduler")
    log.info("converting the fp16-fix VAE to float16")
    vae = AutoencoderKL.from_pretrained(
        snapshots["vae"].folder, torch_dtype=WEIGHT_DTYPE, use_safetensors=True, local_files_only=True
    )
    vae.save_pretrained(out / "vae", safe_serialization=True)


def source_records(sources: Sources, snapshots: dict[str, Snapshot] | None = None) -> dict[str, dict[str, Any]]:
    """The manifest's record of each source: repository, requested revision and (once fetched) its commit."""
    return {
        name: {"repo": source.repo, "revision": source.revision}
        | ({"commit": snapshots[name].commit} if snapshots and name in snapshots else {})
        for name, source in sources.named().items()
    }


def hashing_bar(total: int) -> tqdm:
    return tqdm(total=total, desc="sha256", unit="B", unit_scale=True, unit_divisor=1024)


def keeping_accelerators(dest: Path, sources: Sources) -> Sources:
    """The sources a folder is checked and completed against: the requested ones, with the accelerator the folder
    was built with kept as its default and every accelerator LoRA it holds kept, so that asking for another
    accelerator adds its LoRA (a few hundred MB) beside the others instead of building the folder again (8 GB)."""
    try:
        manifest = read_manifest(dest)
    except (WeightsError, OSError):
        return sources
    if manifest.lora is None or "lora" not in manifest.sources:
        return sources
    default = manifest.lora.get("accelerator", DEFAULT_ACCELERATOR)
    kept = sources
    if default != sources.accelerator:
        built = manifest.sources["lora"]
        kept = sources.with_accelerator(default)
        kept = replace(kept, lora=replace(kept.lora, revision=built.get("revision", kept.lora.revision)))
    extras = {name: Source(ACCELERATORS[name].repo, record.get("revision", "main"), (ACCELERATORS[name].weight_name,))
              for name, record in manifest.sources.items() if name in ACCELERATORS}  # fmt: skip
    if default != sources.accelerator:
        extras[sources.accelerator] = sources.lora
    return replace(kept, extras=tuple(sorted(extras.items())))


def missing_sources(dest: Path, sources: Sources) -> list[str] | None:
    """What a folder lacks: [] when it was built from these sources in this version's layout and every file matches
    its sha256; the names of sources it was built without (the safety checker or the map models, for folders from
    before them), when the rest matches; None when it must be built again."""
    if not (dest / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(dest)
    except WeightsError as error:
        log.info("%s; rebuilding the folder", error)
        return None
    wanted = source_records(sources)
    built_from = {
        name: {"repo": record.get("repo"), "revision": record.get("revision")}
        for name, record in manifest.sources.items()
    }
    if any(wanted.get(name) != record for name, record in built_from.items()) or manifest.lora != lora_record(sources):
        log.info("%s was built from other sources or settings; rebuilding it", dest)
        return None
    missing = [name for name in wanted if name not in built_from]
    if not set(missing) <= ADDABLE:
        log.info("%s lacks %s; rebuilding it", dest, ", ".join(missing))
        return None
    with hashing_bar(sum(record.size for record in manifest.files.values())) as bar:
        problems = find_problems(dest, manifest, hashes=True, progress=bar.update)
    placed = {path for name in missing for path in placed_files(name).values()}
    problems = [problem for problem in problems if problem.removeprefix("unlisted file ") not in placed]
    if problems:
        log.info("%s does not match its manifest (%s); rebuilding it", dest, summarize(problems))
        return None
    return missing


def add_sources(dest: Path, sources: Sources, missing: list[str], downloads: Path, fetcher: Fetcher) -> None:
    """Fetch only what a complete folder lacks and add it, with its files' records, to the manifest."""
    named = sources.named()
    snapshots = fetch_all({name: named[name] for name in missing}, downloads, fetcher)
    added = [path for name in missing for path in place_model(dest, name, snapshots[name])]
    manifest = read_manifest(dest)
    digests = hash_files(dest, added)
    records = {name: FileRecord(size=(dest / name).stat().st_size, sha256=digests[name]) for name in added}
    extended = replace(
        manifest,
        sources={**manifest.sources, **{name: source_records(sources, snapshots)[name] for name in missing}},
        files={**manifest.files, **records},
    )
    partial = manifest_path(dest).with_suffix(".json.partial")
    partial.write_text(extended.to_json(), encoding="utf-8")
    os.replace(partial, manifest_path(dest))
    make_readable(dest)
    log.info("added %s to %s", ", ".join(missing), dest)


def refuse_foreign(dest: Path) -> None:
    """Never replace a folder that is not a weights folder (a mistyped --dest, say)."""
    if (
        dest.is_dir()
        and any(dest.iterdir())
        and not any((dest / name).exists() for name in (MANIFEST_NAME, "model_index.json"))
    ):
        raise DownloadError(f"{dest} exists and is not a weights folder: remove it or pick another --dest")


def remove_leftovers(dest: Path) -> None:
    """Delete the temporary folders of earlier runs that were killed before they could clean up."""
    for leftover in [*dest.parent.glob(f"{dest.name}.tmp-*"), *dest.parent.glob(f"{dest.name}.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def downloads_folder(dest: Path) -> Path:
    return dest.with_name(f"{dest.name}.downloads")


def build_weights(
    dest: Path,
    sources: Sources = DEFAULT_SOURCES,
    downloads: Path | None = None,
    fetcher: Fetcher | None = None,
    keep_downloads: bool = False,
) -> bool:
    """Make dest a complete, verified weights folder; returns False if it already was one (nothing done).

    fetcher replaces the fetch step (default: the Hub, or $WEIGHTS_SNAPSHOTS).
    """
    dest = dest.absolute()
    downloads = (downloads or downloads_folder(dest)).absolute()
    started = time.perf_counter()
    sources = keeping_accelerators(dest, sources)
    missing = missing_sources(dest, sources)
    if missing == []:
        log.info("%s is complete and matches its manifest (%.1fs); nothing to do", dest, time.perf_counter() - started)
        return False
    if missing:
        add_sources(dest, sources, missing, downloads, fetcher or default_fetcher())
        if not keep_downloads:
            shutil.rmtree(downloads, ignore_errors=True)
        return True
    refuse_foreign(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dest)
    snapshots = fetch_all(sources.named(), downloads, fetcher or default_fetcher())
    fetched = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f"{dest.name}.tmp-", dir=dest.parent))
    try:
        out = staging / dest.name
        build_folder(out, snapshots, sources)
        built = time.perf_counter()
        total = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
        with hashing_bar(total) as bar:
            write_manifest(
                out, sources=source_records(sources, snapshots), lora=lora_record(sources), progress=bar.update
            )
        make_readable(out)
        replace_folder(out, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not keep_downloads:
        shutil.rmtree(downloads, ignore_errors=True)
    done = time.perf_counter()
    log.info(
        "wrote %s (%.2f GB) in %.0fs: fetch %.0fs, build %.0fs, manifest %.0fs",
        dest,
        total / 1e9,
        done - started,
        fetched - started,
        built - fetched,
        done - built,
    )
    return True


def make_readable(folder: Path) -> None:
    """Usual permissions on the folder and its files: mkdtemp makes 0700 folders and safetensors writes 0600 files,
    which the user a container runs as may not be able to read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
