"""The soak: 100 varied requests through Cog's server, every answer checked, the worker's memory after each (the
soak test and `scripts/measure heap` both run it)."""

from pathlib import Path

from PIL import Image

from ..limits import MAX_NUM_OUTPUTS
from .cog_server import RunningServer, decode_output, predict, wait_until_ready
from .pictures import faint_map, flat_map, photo

SOAK_PREDICTIONS = 100
SOAK_WARM_UP = 20
SOAK_RSS_MARGIN = 32 * 2**20
"""Measured in the suite: the worker's RSS rose 9-13 MiB after the warm-up under the default heap policy, edit-in-heap,
10-12 MiB under mmap-32mib and 11-14 MiB under mmap-1mib; glibc's defaults and no-mmap rose further (docs/BENCHMARKS.md,
scripts/measure heap)."""
SOAK_SIZES = [(48, 32), (200, 150), (640, 480), (33, 77), (1200, 900)]
SOAK_INPUT_FORMATS = ["png", "jpg", "webp"]
SOAK_OUTPUT_FORMATS = ["webp", "png", "jpg"]


def write_soak_inputs(folder: Path) -> None:
    """The pictures and maps the soak's requests name, to be served from `folder`."""
    for index, (width, height) in enumerate(SOAK_SIZES):
        picture = Image.fromarray(photo(width, height, seed=index))
        for input_format in SOAK_INPUT_FORMATS:
            picture.save(folder / f"picture-{index}.{input_format}", quality=90)
        (folder / f"black-{index}.png").write_bytes(flat_map(width, height))
        (folder / f"faint-{index}.png").write_bytes(faint_map(width, height))
    (folder / "wrong-aspect.png").write_bytes(flat_map(10, 100))


def soak_request(number: int, url: str) -> tuple[dict, tuple[int, int] | None]:
    """The inputs of soak prediction `number`, and the size its outputs must have (None: it must be refused).

    Every 10th runs the model (one step, 1 or 2 outputs, each picture size in turn); 4 are refused; the rest
    keep everything (all-black map) with 1 to 4 outputs. Sizes, input and output formats rotate.
    """
    runs_model = number % 10 == 5
    index = (number // 10) % len(SOAK_SIZES) if runs_model else number % len(SOAK_SIZES)
    change_map = f"{'faint' if runs_model else 'black'}-{index}.png"
    if number % 25 == 13:
        change_map = "wrong-aspect.png"
    inputs = {
        "image": f"{url}/picture-{index}.{SOAK_INPUT_FORMATS[(number // 3) % 3]}",
        "map": f"{url}/{change_map}",
        "num_outputs": 1 + (number // 10) % 2 if runs_model else 1 + number % MAX_NUM_OUTPUTS,
        "output_format": SOAK_OUTPUT_FORMATS[number % 3],
        "seed": number,
    }
    return inputs, None if change_map == "wrong-aspect.png" else SOAK_SIZES[index]


def run_soak(server: RunningServer, files_url: str, server_tmp: Path) -> tuple[list[int], list[list[str]]]:
    """The soak's predictions, each answer checked (count, size, format, or the refusal); after each, the worker's
    RSS and the names in its temporary folder.

    Inputs are URLs, as on Replicate: coglet 0.23 keeps every data-URI input alive (about 2.6 times its size per
    request), which would swamp the predictor's own figures.
    """
    rss, temporary_files = [], []
    for number in range(SOAK_PREDICTIONS):
        inputs, size = soak_request(number, files_url)
        assert wait_until_ready(server.url)
        result = predict(server.url, inputs)
        if size is None:
            assert result["status"] == "failed" and "map: its aspect ratio" in result["error"], result
        else:
            assert result["status"] == "succeeded", result.get("error")
            assert len(result["output"]) == inputs["num_outputs"]
            mime = f"image/{inputs['output_format'].replace('jpg', 'jpeg')}"
            for uri in result["output"]:
                assert uri.startswith(f"data:{mime};base64,") and decode_output(uri).size == size
        assert wait_until_ready(server.url)
        rss.append(server.worker_rss())
        temporary_files.append(sorted(path.name for path in server_tmp.iterdir()))
    return rss, temporary_files
