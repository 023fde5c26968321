"""Fetch SDXL 1.0 base (fp16), the fp16-fix VAE, the Flash-SDXL LoRA, the safety checker and the two map models,
and write the MODEL_CACHE folder with its manifest.json (models/weights/build.py does the work; setup() runs the same
code when the folder is missing).

    python scripts/download-weights [--dest DIR] [--sdxl-revision R] [--vae-revision R] [--lora-revision R] ...
    cog exec python scripts/download-weights          # the same, inside the Cog image

Safe to re-run and to interrupt: a complete folder is verified and left alone, an interrupted run resumes.
"""

import argparse
import errno
import logging
import sys
from pathlib import Path

from diffusers.utils import logging as diffusers_logging

from ..accelerators import ACCELERATORS, DEFAULT_ACCELERATOR
from ..errors import ProjectError
from ..settings import model_cache
from ..weights.build import build_weights, hashing_bar
from ..weights.manifest import check_against_manifest, read_manifest
from ..weights.sources import DEFAULT_SOURCES


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="download-weights",
        description="Fetch SDXL 1.0 base (fp16), the fp16-fix VAE and Flash-SDXL; write MODEL_CACHE with its manifest.",
        epilog=(
            f"Defaults: SDXL {DEFAULT_SOURCES.sdxl.repo}@{DEFAULT_SOURCES.sdxl.revision}, "
            f"VAE {DEFAULT_SOURCES.vae.repo}@{DEFAULT_SOURCES.vae.revision}, "
            f"LoRA {DEFAULT_SOURCES.lora.repo}@{DEFAULT_SOURCES.lora.revision} (models/weights/sources.py). "
            "About 7 GB is downloaded; the folder hard-links the downloaded files where the disk allows."
        ),
    )
    parser.add_argument(
        "--dest", type=Path, default=model_cache(), help="weights folder (default: $MODEL_CACHE or model-cache)"
    )
    parser.add_argument(
        "--accelerator", choices=tuple(ACCELERATORS), default=DEFAULT_ACCELERATOR,
        help="the few-step LoRA the folder carries: " + "; ".join(
            f"{name}: {accelerator.title} ({accelerator.licence})" for name, accelerator in ACCELERATORS.items()
        ),
    )  # fmt: skip
    for name, source in DEFAULT_SOURCES.named().items():
        parser.add_argument(f"--{name}-revision", metavar="R", help=f"commit, tag or branch of {source.repo}")
    parser.add_argument("--downloads", type=Path, help="hub cache for the downloads (default: DEST.downloads)")
    parser.add_argument("--keep-downloads", action="store_true", help="keep the hub cache after a successful run")
    parser.add_argument("--check", action="store_true", help="only check DEST against its manifest, sha256 included")
    return parser.parse_args(argv)


def check(folder: Path) -> None:
    manifest = read_manifest(folder)
    with hashing_bar(sum(record.size for record in manifest.files.values())) as bar:
        check_against_manifest(folder, hashes=True, progress=bar.update)
    print(f"{folder} matches its manifest: {manifest.describe()}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    revisions = {name: getattr(args, f"{name}_revision") for name in DEFAULT_SOURCES.named()}
    sources = DEFAULT_SOURCES.with_accelerator(args.accelerator).pinned(**revisions)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    diffusers_logging.set_verbosity_error()
    try:
        if args.check:
            check(args.dest)
        else:
            build_weights(args.dest, sources, downloads=args.downloads, keep_downloads=args.keep_downloads)
    except ProjectError as error:
        print(f"download-weights: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        print(
            f"download-weights: the disk is full ({error.filename or args.dest}): free about 8 GB and run again;"
            " finished downloads are kept",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("download-weights: interrupted; run it again to resume", file=sys.stderr)
        return 130
    return 0
