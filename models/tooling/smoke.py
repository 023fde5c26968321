"""No-GPU smoke run: serve predict.py with Cog's HTTP server on tiny random weights and write one output.

    .venv/bin/python scripts/smoke [--out outputs/smoke.webp]

The picture is noise-like (the weights are random); the point is that the whole serving path works.
"""

import argparse
import base64
import tempfile
from pathlib import Path

from .cog_server import cog_server, data_uri, predict
from .random_weights.build import write_test_weights

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "smoke.webp", help="where to write the result")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        weights = Path(scratch) / "model-cache"
        write_test_weights(weights)
        with cog_server(weights, Path(scratch) / "server.log") as url:
            inputs = {
                "prompt": "a dramatic sunset sky with pink clouds",
                "image": data_uri((ROOT / "examples" / "photo.jpg").read_bytes(), "image/jpeg"),
                "map": data_uri((ROOT / "examples" / "map.png").read_bytes()),
                "seed": 42,
            }
            result = predict(url, inputs)
    if result.get("status") != "succeeded":
        print(f"smoke: the prediction failed: {result.get('error')}")
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(base64.b64decode(result["output"][0].split(",", 1)[1]))
    print(result["logs"].strip())
    print(f"wrote {args.out}")
    return 0
