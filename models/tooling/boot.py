"""One setup in a fresh process, for `scripts/measure setup`: the imports' seconds, then load_pipeline's stages (the
timings it records), printed as one line of JSON. It lies outside the measure package, whose own imports would
otherwise come before the clock starts.

    python -m models.tooling.boot FOLDER DEVICE DTYPE
"""

import json
import logging
import sys
import time

started = time.perf_counter()

import torch  # noqa: E402 - the imports are what is timed

from ..weights.load import load_pipeline  # noqa: E402

imported = time.perf_counter()


def main(argv: list[str]) -> int:
    folder, device, dtype = argv
    logging.basicConfig(level=logging.INFO, format="    %(message)s", stream=sys.stderr)
    pipeline = load_pipeline(folder, torch.device(device), getattr(torch, dtype))
    print(json.dumps({"import_s": imported - started, **pipeline.setup_timings}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
