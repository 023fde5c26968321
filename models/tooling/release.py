"""Stage the folder to publish a version from: the files the image needs, and the weights folder in layers of its own.

    python scripts/stage-release [--weights DIR] [--dest DIR]
    cd DEST && COGLET_WHEEL=pypi:0.23.1 cog push --separate-weights r8.im/<owner>/<model>

Why a folder of its own: `cog push --separate-weights` makes every file of 10 MB or more a weights layer by walking
the folder WITHOUT reading .dockerignore, so from the project folder it would take the virtual environment, download
caches and benchmark weights, and fail on the ones .dockerignore then hides from the build. The staged folder holds
exactly what .dockerignore lets into the image, plus `model-cache/` (hard-linked where the disk allows: no second
7 GB), verified against its manifest first. A version that changes only code then uploads only the code layer.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

from ..errors import FolderError, ProjectError
from ..settings import model_cache
from ..weights.manifest import check_against_manifest

ROOT = Path(__file__).resolve().parents[2]

STAGED_MARKER = ".staged-release"
WEIGHTS_IN_IMAGE = "model-cache"
"""Where the weights lie in the image: /src/model-cache, setup()'s default MODEL_CACHE."""

COG_WEIGHT_MIN_BYTES = 10 * 1024 * 1024
COG_NOT_WEIGHT_PREFIXES = (".cog", ".git", "__pycache__")
COG_NOT_WEIGHT_SUFFIXES = (
    ".py", ".ipynb", ".whl", ".jpg", ".jpeg", ".png", ".webp", ".svg", ".gif", ".avif", ".heic",
    ".mp4", ".mov", ".avi", ".wmv", ".mkv", ".webm", ".mp3", ".wav", ".ogg", ".flac", ".aac", ".m4a", ".log",
)  # fmt: skip
"""Cog 0.23's rules for --separate-weights (pkg/weightslegacy/weights.go): files from 10 MB up, not code or media."""


def ignore_patterns(path: Path) -> list[tuple[bool, re.Pattern]]:
    """A .dockerignore's patterns as (is an exception, regex), in order; the last one that matches decides."""
    patterns = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        parts = os.path.normpath(line.removeprefix("!").strip()).lstrip("/").split("/")
        regex = ""
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            if part == "**":
                regex += ".*" if last else "(?:.*/)?"  # any number of folders, none included
            else:
                regex += "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in part)
                regex += "" if last else "/"
        patterns.append((exception, re.compile(regex)))
    return patterns


def is_ignored(relative: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: a pattern matches a path or any folder above it; the last matching pattern wins."""
    parts = relative.split("/")
    ignored = False
    for exception, regex in patterns:
        if any(regex.fullmatch("/".join(parts[:depth])) for depth in range(1, len(parts) + 1)):
            ignored = not exception
    return ignored


def image_files(root: Path) -> list[str]:
    """The files of a folder that `cog build` puts into the image, as sorted relative paths."""
    patterns = ignore_patterns(root / ".dockerignore")
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name != ".git"]
        for name in names:
            relative = (Path(folder) / name).relative_to(root).as_posix()
            if not is_ignored(relative, patterns):
                files.append(relative)
    return sorted(files)


def weight_layers(root: Path) -> dict[str, int]:
    """The weight layers `cog push --separate-weights` makes of a folder, with their sizes, by Cog 0.23's rules: the
    folder of each large file (the top-most where they nest; large files at the top level alone), dropped when a
    code file's path starts with its name."""
    large: list[str] = []
    code: list[str] = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name != ".git"]
        for name in names:
            path = Path(folder) / name
            relative = path.relative_to(root).as_posix()
            if name.endswith((".py", ".ipynb")):
                code.append(relative)
            elif path.stat().st_size >= COG_WEIGHT_MIN_BYTES and not (
                relative.startswith(COG_NOT_WEIGHT_PREFIXES) or relative.endswith(COG_NOT_WEIGHT_SUFFIXES)
            ):
                large.append(relative)
    layers: list[str] = []
    for relative in sorted(large, key=lambda path: (path.count("/"), path)):
        folder = relative.rpartition("/")[0]
        if not folder:
            layers.append(relative)
        elif not any(f"{folder}/".startswith(f"{layer}/") for layer in layers):
            layers.append(folder)
    layers = [layer for layer in layers if not any(path.startswith(layer) for path in code)]
    return {layer: sum(file.stat().st_size for file in [root / layer, *(root / layer).rglob("*")] if file.is_file())
            for layer in sorted(layers)}  # fmt: skip


def link_or_copy(origin: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(origin, target)
    except OSError:
        shutil.copy2(origin, target)


def stage(weights: Path, dest: Path) -> dict[str, int]:
    """Fill dest with the image's files and the verified weights folder; returns the weight layers Cog will push."""
    check_against_manifest(weights, hashes=True)
    if dest.exists():
        if any(dest.iterdir()) and not (dest / STAGED_MARKER).exists():
            raise FolderError(f"{dest} exists and was not made by stage-release; pick another --dest")
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for relative in image_files(ROOT):
        link_or_copy(ROOT / relative, dest / relative)
    for file in sorted(path for path in weights.rglob("*") if path.is_file()):
        link_or_copy(file, dest / WEIGHTS_IN_IMAGE / file.relative_to(weights))
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8")
    (dest / ".dockerignore").write_text(f"{ignore}!{WEIGHTS_IN_IMAGE}/\n", encoding="utf-8")
    (dest / STAGED_MARKER).write_text("made by scripts/stage-release; safe to delete\n", encoding="utf-8")
    return weight_layers(dest)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="stage-release", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=model_cache(), help="weights folder (default: $MODEL_CACHE)")
    parser.add_argument(
        "--dest",
        type=Path,
        default=ROOT.with_name(f"{ROOT.name}-release"),
        help="folder to stage (default: ../<project>-release)",
    )
    args = parser.parse_args(argv)
    try:
        layers = stage(args.weights.absolute(), args.dest.absolute())
    except ProjectError as error:
        print(f"stage-release: {error}", file=sys.stderr)
        return error.exit_code
    print(f"staged {args.dest}; weight layers of `cog push --separate-weights`:")
    for path, size in layers.items():
        print(f"  {path}  {size / 1e9:.2f} GB")
    print(f"next: cd {args.dest} && COGLET_WHEEL=pypi:0.23.1 cog push --separate-weights r8.im/<owner>/<model>")
    return 0
