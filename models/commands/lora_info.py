"""What a LoRA is and whether this model would apply it, without loading any weights.

    python scripts/lora-info my-style.safetensors
    python scripts/lora-info https://civitai.com/api/download/models/12345 --civitai-api-token KEY
    python scripts/lora-info owner/repo/lora.safetensors --json

SOURCE is a local file or anything lora_weights accepts, fetched through the same checks and cache as a request.
The file is read against SDXL's architecture on the meta device (or a weights folder's configs with --weights): its
naming, the layers it changes by part of SDXL, LoRA/LoHa/LoKr/DoRA/full differences, ranks and scales, the tokens it
brings, and the memory a merge keeps. Exit 0 when it would be applied; 2 with the one line a request would get when
it would be refused.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from safetensors import safe_open

from ..errors import InputError, ProjectError
from ..loras.cache import LoraCache
from ..loras.client import CIVITAI_TOKEN_INPUT, HF_TOKEN_INPUT
from ..loras.fetch import fetch_lora
from ..loras.formats import read_lora
from ..loras.header import LoraError
from ..loras.names import Targets
from ..loras.summary import LoraSummary, summarise
from ..loras.tokens import read_tokens_file
from ..weights.architecture import meta_models

NAME = "lora"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lora-info", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )  # fmt: skip
    parser.add_argument("source", metavar="SOURCE", help="a local .safetensors or training .tar, a URL, or repo/file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    parser.add_argument("--weights", type=Path, help="read against this weights folder's configs (default: SDXL 1.0)")
    parser.add_argument(f"--{HF_TOKEN_INPUT.replace('_', '-')}", dest="hf_token", help="for private Hugging Face files")
    parser.add_argument(f"--{CIVITAI_TOKEN_INPUT.replace('_', '-')}", dest="civitai_token", help="for Civitai files")
    parser.add_argument("--cache", type=Path, help="LoRA cache folder (default: as the server's, $LORA_CACHE)")
    return parser.parse_args(argv)


def describe_lora(
    source: str, weights: Path | None = None, cache: LoraCache | None = None, **tokens: str | None
) -> LoraSummary:
    """Fetch (or find in the cache) and read a LoRA as a request would, and summarise it; InputError when a request
    would refuse it."""
    cache = cache or LoraCache()
    path = fetch_lora(NAME, source, cache=cache, allow_paths=True, hf_token=tokens.get("hf_token"),
                      civitai_token=tokens.get("civitai_token"))  # fmt: skip
    if path is None:
        raise InputError(f"{NAME}: empty source")
    targets = Targets.of(meta_models(weights))
    try:
        contents = read_lora(path, targets)
        contents.token_sets.extend(read_tokens_file(cache.tokens(path)))
        with safe_open(str(path), framework="pt") as file:
            keys = list(file.keys())
    except LoraError as error:
        raise InputError(f"{NAME}: {error}") from None
    return summarise(keys, contents, targets)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    cache = LoraCache(args.cache) if args.cache else None
    try:
        tokens = {"hf_token": args.hf_token, "civitai_token": args.civitai_token}
        summary = describe_lora(args.source, args.weights, cache, **tokens)
    except ProjectError as error:
        if args.json:
            print(json.dumps({"applies": False, "refusal": str(error)}))
        else:
            print(f"would be refused: {error}")
        return error.exit_code
    if args.json:
        print(json.dumps({"applies": True, **summary.to_json()}))
    else:
        print("\n".join(["would be applied", *summary.lines()]))
    return 0
