"""Measurements of single features, side by side where they compare: `scripts/measure <what>`.

    scripts/measure setup [DIR] [--build]        setup() against reading the same files (cold and warm)
    scripts/measure loras [--weights DIR]        applying, switching and removing user LoRAs; merged against beside
    scripts/measure crop [--weights DIR]         a small edit in a large photo: on a crop against the whole picture
    scripts/measure safety [--weights DIR]       the safety checker's cost per request
    scripts/measure maps [--weights DIR]         map_prompt's and map_depth's models and the outpainting's fill
    scripts/measure low-memory [--weights DIR]   the low-memory mode on an emulated 8 GB GPU
    scripts/measure heap [--policies ...]        the heap policies: the soak's memory and speed through Cog's server

Each prints a table; --json PATH also writes its figures, for tools that read them (scripts/gpu-check).
"""

import argparse
import json
import sys
from pathlib import Path

from ...settings import model_cache
from . import crop, heap, loras, low_memory, maps, safety, setup, training

MEASUREMENTS = {
    "setup": setup,
    "loras": loras,
    "crop": crop,
    "safety": safety,
    "maps": maps,
    "low-memory": low_memory,
    "heap": heap,
    "training": training,
}
"""Each module gives add_arguments(parser) and run(args) -> Table."""

OWN_FOLDER_FLAGS = ("setup", "heap")
"""Measurements that name their weights folder their own way; the others take --weights."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="measure", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:9]),
    )  # fmt: skip
    measurements = parser.add_subparsers(dest="what", required=True, metavar="what")
    for name, module in MEASUREMENTS.items():
        sub = measurements.add_parser(name, help=(module.__doc__ or "").splitlines()[0])
        if name not in OWN_FOLDER_FLAGS:
            sub.add_argument("--weights", type=Path, default=model_cache(), help="default: $MODEL_CACHE")
        sub.add_argument("--json", type=Path, help="also write the figures to this file")
        module.add_arguments(sub)
    args = parser.parse_args(argv)
    args.command = "scripts/measure " + " ".join(argv)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    table = MEASUREMENTS[args.what].run(args)
    print(table.text(), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(table.to_json(), indent=2, default=str))
    sys.stdout.flush()
    return 0
