"""Edit a picture from the command line, without Cog: the same serving path, validation and bytes as the predictor.

    python scripts/edit --prompt "a dramatic sunset sky" --image photo.jpg --map map.png [--out edited.webp]
    python scripts/edit ... --num-outputs 4 --out outputs/sky/          # several outputs: a folder
    python scripts/edit ... --low-vram                                  # for GPUs of 8-12 GB
    python scripts/edit ... --accelerator tcd                           # another few-step LoRA the folder holds

Every input of the predictor is a flag of the same name (dashes for underscores), made from the table of inputs
(models/inputs.py) and validated by it, so a bad value gets the predictor's own one-line message, and exit status 2.
Files are local paths here (the server refuses paths); --lora-weights takes a local .safetensors file too. Missing
weights are built as setup builds them (or one line names the command). Progress bars and the log (seed, sizes,
timings) go to stderr; the paths written go to stdout, one a line; --quiet keeps only those.
"""

import argparse
import logging
import sys
from pathlib import Path

from .. import settings
from ..accelerators import ACCELERATORS
from ..errors import ProjectError
from ..inputs import INPUTS, Request
from ..loras.cache import LoraCache
from ..service import EditService
from ..validation import local_file
from ..weights.load import LOADED_STAGES, select_device
from .flags import add_flag

OUTPUT_SUFFIXES = {".webp": "webp", ".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "outputs"
"""Where outputs go without --out: outputs/ in the project's folder."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="edit", description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    edit = parser.add_argument_group("the edit (the predictor's inputs)")
    for spec in INPUTS.values():
        if spec.name == "output_format":  # its default comes from --out's suffix first
            help_text = f"{spec.description} (default: from --out's suffix, else {spec.default})"
            edit.add_argument("--output-format", default=None, help=help_text)
        else:
            add_flag(edit, spec)
    run = parser.add_argument_group("running it")
    run.add_argument("--out", type=Path, default=None,
                     help="a file, or a folder for several outputs (default: outputs/<image>-<seed>...)")  # fmt: skip
    run.add_argument("--weights", type=Path, default=None, help="weights folder (default: $MODEL_CACHE or model-cache)")
    run.add_argument("--device", default="auto", help="auto, cuda or cpu")
    run.add_argument("--low-vram", action="store_true", help="model offload and VAE tiling, for 8-12 GB GPUs")
    run.add_argument("--accelerator", choices=tuple(ACCELERATORS), default=None,
                     help="the few-step LoRA to use, among those the weights folder holds (default: $ACCELERATOR, else"
                          " the one it was built with)")  # fmt: skip
    run.add_argument("--quiet", action="store_true", help="no log or progress bars: only the paths written")
    return parser.parse_args(argv)


def output_paths(out: Path | None, image: Path, seed: int, count: int, output_format: str) -> list[Path]:
    """Where the outputs go: --out as a file for one output with a suffix, else as a folder; by default outputs/."""
    if out is not None and count == 1 and out.suffix.lower() in OUTPUT_SUFFIXES:
        paths = [out]
    else:
        folder = out if out is not None else DEFAULT_OUT
        names = [f"{image.stem}-{seed}" + (f"-{index}" if count > 1 else "") for index in range(count)]
        paths = [folder / f"{name}.{output_format}" for name in names]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    return paths


class Progress:
    """tqdm bars for loading and for the denoising steps, on stderr."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None

    def loaded(self, name: str) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=len(LOADED_STAGES), desc="loading", unit="model", file=sys.stderr)
        self.bar.set_postfix_str(name)
        self.bar.update()
        if self.bar.n == self.bar.total:
            self.bar.close()
            self.bar = None

    def step(self, done: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr)
        self.bar.update()
        if done == total:
            self.bar.close()
            self.bar = None


def request_of(args: argparse.Namespace) -> Request:
    """The flags as the predictor's request; the output format from --out's suffix unless given."""
    values = {name: getattr(args, name) for name in INPUTS}
    suffix_format = OUTPUT_SUFFIXES.get(args.out.suffix.lower()) if args.out is not None else None
    values["output_format"] = args.output_format or suffix_format or INPUTS["output_format"].default
    return Request.from_values(values, file_check=local_file)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr, force=True
    )
    from tqdm.contrib.logging import logging_redirect_tqdm as log_above_bars
    from transformers.utils import logging as transformers_logging

    progress = Progress(args.quiet)
    weights = args.weights or settings.model_cache()
    transformers_logging.disable_progress_bar()  # the loading bar counts models; this one would count tensors
    for handler in logging.getLogger().handlers:  # the step bar stands in for the server's per-step log lines
        handler.addFilter(lambda record: not record.getMessage().startswith("denoising step"))
    try:
        request = request_of(args)
        device, dtype = select_device(args.device)
        with log_above_bars():
            beside_weights = weights.absolute().with_name(f"{weights.absolute().name}.loras")
            cache = LoraCache(None if settings.folder(settings.LORA_CACHE) else beside_weights)
            service = EditService.start(
                weights, lora_cache=cache, allow_lora_paths=True, device=device, dtype=dtype,
                low_vram=args.low_vram or None, on_loaded=progress.loaded, accelerator=args.accelerator,
            )  # fmt: skip

            def paths(count: int, output_format: str) -> list[Path]:
                return output_paths(args.out, request.image, request.edit.seed, count, output_format)

            prediction = service.run(request, paths, on_step=progress.step)
    except ProjectError as error:
        print(f"edit: {error}", file=sys.stderr)
        return error.exit_code
    for path in prediction.paths:
        print(path)
    logging.getLogger("edit").info("wrote %d picture(s)", len(prediction.paths))
    return 0
