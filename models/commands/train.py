"""Train a LoRA from the command line, without Cog: the same inputs, validation and .tar as the Cog trainer.

    python scripts/train --images photos.zip --out my-lora.tar
    python scripts/train --images photos.zip --out my-lora.tar --mask-prompt "a face" --steps 1500 --seed 7

Every input of the trainer is a flag of the same name (dashes for underscores; --images for input_images), made
from the table of training inputs (models/training/inputs.py) and validated by it, so a bad value gets the trainer's
own one-line message and exit status 2. The weights folder is the editor's ($MODEL_CACHE or model-cache), built
first when missing. A progress bar and the log go to stderr; the .tar's path goes to stdout. Ctrl-C stops the
training and leaves no file.
"""

import argparse
import logging
import sys
from pathlib import Path

from .. import settings
from ..errors import InputError, ProjectError
from ..training.inputs import TRAINING_INPUTS, TrainingRequest
from ..training.run import train_lora
from ..validation import local_file
from .flags import add_flag

DEFAULT_OUT = Path("trained_model.tar")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train", description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    inputs = parser.add_argument_group("the training (the Cog trainer's inputs)")
    for spec in TRAINING_INPUTS.values():
        add_flag(inputs, spec, aliases=("--images",) if spec.name == "input_images" else ())
    run = parser.add_argument_group("running it")
    run.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the .tar to write")
    run.add_argument("--weights", type=Path, default=None, help="weights folder (default: $MODEL_CACHE or model-cache)")
    run.add_argument("--device", default="auto", help="auto, cuda or cpu")
    run.add_argument("--quiet", action="store_true", help="no log or progress bar: only the path written")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr, force=True
    )
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm as log_above_bars

    bar = None

    def on_step(step: int, total: int) -> None:
        nonlocal bar
        if args.quiet:
            return
        if bar is None:
            bar = tqdm(total=total, desc="training", unit="step", file=sys.stderr)
        bar.update()
        if step == total:
            bar.close()

    try:
        values = {name: getattr(args, name) for name in TRAINING_INPUTS}
        request = TrainingRequest.from_values(values, file_check=local_file)
        if args.out.is_dir():
            raise InputError(f"out: {args.out} is a folder; give the .tar's file name")
        args.out.parent.mkdir(parents=True, exist_ok=True)  # before the training, not after it
        with log_above_bars():
            result = train_lora(request, args.out, args.weights or settings.model_cache(), args.device, on_step)
    except ProjectError as error:
        print(f"train: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("train: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(result.tar)
    return 0
