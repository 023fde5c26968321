"""Benchmark the serving path against plain diffusers, side by side, with stage timings and the FLOP floor.

    scripts/benchmark [--weights DIR] [--sizes 512,768,1024,1216x832] [--batches 1,2,4] [--out DIR]
    scripts/benchmark --quick            # tiny random weights, one small size: proves the script works
    scripts/benchmark --server --sizes 1024 --batches 1 --change all --output-format png
                                         # also through Cog's HTTP server, as users get it

Without --weights it uses full-size random weights (scripts/make-test-weights --size full, made once in
bench-weights/full). Each grid point is a generation size: the input picture has that size and the benchmark sets the
working area to match, so both pipelines do the same work (serving always works at about one megapixel, so --server
takes only sizes that serving edits as they are). "ours" is EditService.run, the path predict.py serves, heap policy
included: this process applies the policy in setup, as the worker does, so plain diffusers runs beside it under the
policy's between-edit settings. Writes benchmark.json and benchmark.md to --out.
"""

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...accelerators import ACCELERATORS, DEFAULT_ACCELERATOR
from ...inputs import Request
from ...loras.cache import LoraCache
from ...pictures.write import OUTPUT_FORMATS, numbered_paths
from ...service import EditService
from ...sizing import working_size
from ...validation import local_file
from ...weights.load import select_device
from ..cog_server import RunningServer, data_uri, decode_output, predict, running_cog_server, wait_until_ready
from ..files import git_commit, write_atomically
from ..measuring import PeakMemory, interleaved, paired_speedups, weight_bytes
from ..random_weights.build import write_test_weights
from .baseline import PROMPT, QUALITY, SEED, baseline_lora, diffusers_run, load_diffusers
from .floor import count_flops, matmul_rate
from .report import SERVER_TARGET, markdown

ROOT = Path(__file__).resolve().parents[3]

CHANGES = ("top-half", "all")
"""What the map changes: the top half fully (4 active steps, a composite with a seam), or every pixel (the same work
as plain img2img at strength 1)."""


@dataclass(frozen=True)
class Options:
    """How each grid point is measured."""

    steps: int = 4
    warmup: int = 1
    repeats: int = 3
    change: str = "top-half"
    output_format: str = "webp"
    diffusers: bool = True
    """Plain diffusers beside ours."""
    baseline_lora: Path | None = None
    """The LoRA the baseline loads unfused; None: the weights folder's own."""
    no_baseline_lora: bool = False
    sequential: bool = False
    """All of ours first, then diffusers loaded and run, for when both pipelines do not fit in memory at once."""


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height or width)


def make_inputs(folder: Path, width: int, height: int, change: str = "top-half") -> tuple[Path, Path]:
    """The example picture at this size as PNG, and a map that changes its top half or all of it fully."""
    photo = Image.open(ROOT / "examples" / "photo.jpg").convert("RGB").resize((width, height), Image.LANCZOS)
    change_map = np.zeros((height, width), np.uint8)
    change_map[: height if change == "all" else height // 2] = 255
    image_path, map_path = folder / f"photo-{width}x{height}.png", folder / f"map-{width}x{height}.png"
    photo.save(image_path)
    Image.fromarray(change_map).save(map_path)
    return image_path, map_path


def ensure_weights(weights: Path | None, size: str, accelerator: str = DEFAULT_ACCELERATOR) -> Path:
    """The weights folder to benchmark, made with the random test weights of that size (and the accelerator's LoRA
    layout and step rule) when it does not exist yet."""
    if weights is not None and (weights / "model_index.json").exists():
        return weights
    name = size if accelerator == DEFAULT_ACCELERATOR else f"{size}-{accelerator}"
    folder = weights or ROOT / "bench-weights" / name
    if not (folder / "model_index.json").exists():
        print(f"making {size} random weights ({accelerator}) in {folder}", flush=True)
        write_test_weights(folder.absolute(), size, accelerator=accelerator)
    return folder


def edit_values(image_path: Path, map_path: Path, batch: int, steps: int, output_format: str) -> dict:
    """The request every path makes: the prompt, seed and quality of the baseline, at this batch and format."""
    return {"prompt": PROMPT, "image": image_path, "map": map_path, "steps": steps, "num_outputs": batch,
            "seed": SEED, "output_format": output_format, "output_quality": QUALITY}  # fmt: skip


def our_run(service: EditService, values: dict, out: Path, profile: bool = False):
    """EditService.run, the path predict.run() serves after validation, at the picture's own size (the working area
    set to it); profile synchronises after every UNet call to time each."""
    request = Request.from_values(values, local_file)
    width, height = Image.open(request.image).size

    def run() -> dict[str, float]:
        return service.run(request, numbered_paths(out), working_area=width * height, time_each_step=profile).timings

    return run


def server_run(server: RunningServer, values: dict):
    """One prediction through Cog's HTTP server, as a client sends it: data-URI inputs, the outputs read back.

    Returns the server's predict_time as the total, and where the client's wall time went: the predictor's stages
    (the metrics it records with each prediction), the rest of the service's run, Cog's handling outside it (data URIs
    to files, validation, output files to data URIs), and HTTP with JSON on both sides.
    """
    width, height = Image.open(values["image"]).size
    inputs = {**values, "image": data_uri(values["image"].read_bytes()), "map": data_uri(values["map"].read_bytes())}

    def run() -> dict[str, float]:
        if not wait_until_ready(server.url):
            raise RuntimeError(f"Cog server not READY; see {server.log_path}")
        started = time.perf_counter()
        body = predict(server.url, inputs, timeout=3600)
        client_wall = time.perf_counter() - started
        if body.get("status") != "succeeded":
            raise RuntimeError(f"server prediction {body.get('status')}: {body.get('error')}")
        if any(decode_output(uri).size != (width, height) for uri in body["output"]):
            raise RuntimeError("server output has the wrong size")
        predict_time = body["metrics"]["predict_time"]
        stages = dict(body["metrics"]["timings"])
        served = stages.pop("total")
        return {
            "total": predict_time,
            **stages,
            "rest_of_run": served - sum(stages.values()),
            "cog_outside_run": predict_time - served,
            "http_and_json": client_wall - predict_time,
        }

    return run


class Benchmark:
    """Both pipelines loaded once (ours as setup() loads it, diffusers around our tensors), measured point by point."""

    def __init__(self, weights: Path, options: Options, scratch: Path, server: RunningServer | None = None):
        self.weights, self.options, self.scratch, self.server = weights, options, scratch, server
        self.device, self.dtype = select_device()
        self.memory = PeakMemory(self.device)
        started = time.perf_counter()
        self.service = EditService.start(weights, device=self.device, dtype=self.dtype, lora_cache=LoraCache(scratch))
        self.setup_s = time.perf_counter() - started
        pipeline = self.service.pipeline
        self.ours_weights = weight_bytes(pipeline.unet, pipeline.vae, pipeline.sdxl.text_encoder,
                                         pipeline.sdxl.text_encoder_2)  # fmt: skip
        self.lora = None
        if options.diffusers:
            self.lora = baseline_lora(weights, options.baseline_lora, options.no_baseline_lora)
        self.sdxl = None
        if options.diffusers and not options.sequential:
            self.sdxl = load_diffusers(weights, self.device, self.lora, ours=pipeline)
        self.shares_weights = (
            self.sdxl is not None
            and self.sdxl.unet.conv_in.weight.data_ptr() == pipeline.unet.conv_in.weight.data_ptr()
        )

    def point(self, width: int, height: int, batch: int) -> dict:
        """One grid point: the paths interleaved, then one profiled run of each in-process path."""
        options, fmt = self.options, self.options.output_format
        image_path, map_path = make_inputs(self.scratch, width, height, options.change)
        values = edit_values(image_path, map_path, batch, options.steps, fmt)
        runs = {"ours": our_run(self.service, values, self.scratch)}
        if self.sdxl is not None:
            runs["diffusers"] = diffusers_run(self.sdxl, image_path, batch, options.steps, self.device, fmt)
        if self.server is not None:
            runs["server"] = server_run(self.server, values)
        meters = {"ours": self.memory, "diffusers": self.memory}
        measured = interleaved(runs, options.warmup, options.repeats, meters)
        profiled = our_run(self.service, values, self.scratch, profile=True)()
        if self.sdxl is not None:
            profile = diffusers_run(self.sdxl, image_path, batch, options.steps, self.device, fmt, profile=True)
            measured["diffusers"]["profiled_s"] = profile()
        flops = count_flops(self.service.pipeline, width, height, batch)
        return {
            "size": f"{width}x{height}",
            "batch": batch,
            **measured,
            "paired_speedups": paired_speedups(measured),
            **({"server_paired_speedups": paired_speedups(measured, "server")} if self.server is not None else {}),
            "stages_s": {**measured["ours"]["stages_s"], **{k: v for k, v in profiled.items() if "unet_step" in k}},
            "flops": flops,
            "total_flops": options.steps * flops["unet_step"] + flops["vae_encode"] + flops["vae_decode"],
        }

    def baseline_afterwards(self, rows: list[dict]) -> None:
        """--sequential: free our pipeline, then load diffusers alone and measure it at every point."""
        options, fmt = self.options, self.options.output_format
        del self.service
        gc.collect()
        self.sdxl = load_diffusers(self.weights, self.device, self.lora)
        for row in rows:
            width, height = parse_size(row["size"])
            print(f"diffusers {row['size']} batch {row['batch']}", flush=True)
            image_path, _ = make_inputs(self.scratch, width, height, options.change)
            run = diffusers_run(self.sdxl, image_path, row["batch"], options.steps, self.device, fmt)
            row.update(interleaved({"diffusers": run}, options.warmup, options.repeats, {"diffusers": self.memory}))
            profile = diffusers_run(self.sdxl, image_path, row["batch"], options.steps, self.device, fmt, profile=True)
            row["diffusers"]["profiled_s"] = profile()

    def report(self, rows: list[dict], weights_kind: str) -> dict:
        """The rows with the floor of each, and what was measured on what."""
        rate = matmul_rate(self.device, self.dtype)
        for row in rows:
            row["floor_s"] = row["total_flops"] / rate
        diffusers_weights = 0
        if self.sdxl is not None:
            sdxl = self.sdxl
            diffusers_weights = weight_bytes(sdxl.unet, sdxl.vae, sdxl.text_encoder, sdxl.text_encoder_2)
        device, options = self.device, self.options
        return {
            "meta": {
                "date": datetime.now(UTC).strftime("%Y-%m-%d"),
                "device_name": torch.cuda.get_device_name()
                if device.type == "cuda"
                else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                "dtype": str(self.dtype).removeprefix("torch."),
                "weights_kind": weights_kind,
                "weights": str(self.weights),
                "steps": options.steps,
                "change": options.change,
                "output_format": options.output_format,
                "warmup": options.warmup,
                "repeats": options.repeats,
                "server": self.server is not None,
                "server_target": SERVER_TARGET,
                "setup_s": self.setup_s,
                "order": "sequential" if options.sequential else "interleaved",
                "baseline_shares_our_weights": self.shares_weights,
                "baseline_lora": None if self.lora is None else str(self.lora),
                "weights_gib": {"ours": self.ours_weights / 2**30, "diffusers": diffusers_weights / 2**30},
                "matmul_tflops": rate / 1e12,
                "torch": torch.__version__,
            },
            "results": rows,
        }


def run_grid(
    weights: Path,
    points: list[tuple[int, int, int]],
    options: Options,
    scratch: Path,
    server: RunningServer | None = None,
    weights_kind: str = "given",
) -> dict:
    """Every grid point (width, height, batch), then the report."""
    benchmark = Benchmark(weights, options, scratch, server)
    rows = []
    for width, height, batch in points:
        print(f"{width}x{height} batch {batch}", flush=True)
        rows.append(benchmark.point(width, height, batch))
    if options.sequential and options.diffusers:
        benchmark.baseline_afterwards(rows)
    return benchmark.report(rows, weights_kind)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="weights folder (default: full-size random weights)")
    parser.add_argument("--sizes", default="512,768,1024,1216x832", help="generation sizes, WxH or S")
    parser.add_argument("--batches", default="1,2,4", help="num_outputs values")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--accelerator", choices=tuple(ACCELERATORS), default=DEFAULT_ACCELERATOR,
        help="whose LoRA and step rule the random weights carry (the cost per step should be the same)",
    )  # fmt: skip
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-diffusers", action="store_true", help="skip the plain diffusers comparison")
    parser.add_argument(
        "--baseline-lora",
        type=Path,
        help="a LoRA file the diffusers baseline loads unfused (default: the weights folder's Flash-SDXL file)",
    )
    parser.add_argument("--no-baseline-lora", action="store_true", help="the diffusers baseline without a LoRA")
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="run all of ours, then load diffusers and run it (when both pipelines do not fit in memory at once)",
    )
    parser.add_argument(
        "--server",
        action="store_true",
        help="also run each point through Cog's HTTP server (data-URI inputs, outputs read back), interleaved",
    )
    parser.add_argument("--change", choices=CHANGES, default="top-half", help="what the map changes")
    parser.add_argument("--output-format", choices=OUTPUT_FORMATS, default="webp")
    parser.add_argument(
        "--quick", action="store_true", help="tiny weights, 256x256 (1024x1024 with --server), batch 1, one repeat"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmark")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.warmup, args.repeats = "1024" if args.server else "256", "1", 0, 1
    if args.server and args.sequential:
        parser.error("--server runs the paths interleaved, not with --sequential")
    sizes = [parse_size(size) for size in args.sizes.split(",")]
    unserved = [f"{width}x{height}" for width, height in sizes if working_size(width, height) != (width, height)]
    if args.server and unserved:
        parser.error(
            f"--server: serving edits {', '.join(unserved)} at about one megapixel instead; give sizes it edits as they"
            " are, such as 1024 or 1216x832"
        )
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    commit = git_commit()  # now: the tree may move on while the benchmark runs
    points = [(*parse_size(size), int(batch)) for size in args.sizes.split(",") for batch in args.batches.split(",")]
    options = Options(
        steps=args.steps, warmup=args.warmup, repeats=args.repeats, change=args.change,
        output_format=args.output_format, diffusers=not args.no_diffusers, baseline_lora=args.baseline_lora,
        no_baseline_lora=args.no_baseline_lora, sequential=args.sequential,
    )  # fmt: skip
    weights = ensure_weights(args.weights, "tiny" if args.quick else "full", args.accelerator)
    kind = "tiny random" if args.quick else "given" if args.weights else "full-size random"
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="benchmark-"))
    with ExitStack() as stack:
        server = None
        if args.server:
            (scratch / "server-tmp").mkdir()
            server_log = scratch / "server.log"
            env = {"TMPDIR": str(scratch / "server-tmp")}
            server = stack.enter_context(running_cog_server(weights, server_log, env=env, startup_timeout=3600))
            print(f"Cog server ready at {server.url}, log in {server_log}", flush=True)
        report = run_grid(weights, points, options, scratch, server, kind)
    report["meta"]["commit"] = commit
    report["meta"]["command"] = "scripts/benchmark " + " ".join(argv)
    print(write_report(report, args.out), flush=True)
    return 0


def write_report(report: dict, out: Path) -> str:
    """benchmark.json and benchmark.md into a folder, each replaced in one step; returns the tables."""
    write_atomically(out / "benchmark.json", json.dumps(report, indent=2))
    table = markdown(report)
    write_atomically(out / "benchmark.md", table)
    return table
