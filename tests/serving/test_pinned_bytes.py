"""The same request gives the same bytes through Cog's server: outputs pinned by sha256 before the redesign of
issue 21 moved the code into new homes, so that a move that changed behaviour fails here.

The inputs are files in tests/data/pinned. Generated pixels come from float kernels that PyTorch picks by the CPU's
instruction set, so the pins of generated outputs hold on a CPU of the capability they were recorded on; the pin of
the all-black map (the input's own pixels, re-encoded with its metadata) holds everywhere.
"""

import base64
import hashlib
from pathlib import Path

import pytest
import torch

from models.tooling.cog_server import data_uri, predict, running_cog_server, wait_until_ready

pytestmark = pytest.mark.server

PINNED = Path(__file__).resolve().parents[1] / "data" / "pinned"
RECORDED_ON = "AVX512"
"""torch.backends.cpu.get_cpu_capability() of the machine the pins were recorded on."""

REQUESTS = {
    "half-map-png": {"image": "photo.png", "map": "map-half.png", "seed": 7, "output_format": "png"},
    "grown-blurred-spot-two-webp": {
        "image": "photo.png",
        "map": "map-spot.png",
        "map_grow": 4,
        "map_blur": 6,
        "num_outputs": 2,
        "output_format": "webp",
        "output_quality": 80,
        "seed": 11,
    },
    "display-p3-rotated-grey-half-strength-jpg": {
        "image": "p3-rotated.jpg",
        "map": "map-grey.png",
        "strength": 0.5,
        "steps": 2,
        "output_format": "jpg",
        "seed": 3,
    },
    "display-p3-rotated-black-png": {"image": "p3-rotated.jpg", "map": "map-black.png", "output_format": "png"},
}
GENERATES = {name: inputs["map"] != "map-black.png" for name, inputs in REQUESTS.items()}

PINS = {
    "half-map-png": ["dafd327627bc90a676e3951f67b0b15b878206a8054d73452eb00cb5b59b18aa"],
    "grown-blurred-spot-two-webp": [
        "f26948ecd9d1f7f2871f255308fb8afc07825d0185ddbc218f6a2f410191a3d2",
        "60280be7c18241e708cdeea180923f91e9ebf4bf6c597386c597836f23c704bd",
    ],
    "display-p3-rotated-grey-half-strength-jpg": ["4b0002febb0a9fbac8425b2f9bcc906c25342dd1a90467ab4ee417b2f91da3d7"],
    "display-p3-rotated-black-png": ["c7659a565b6e4fbfb02e272ed7f338d86a74198f3b22af15d0983b63b01bc3f0"],
}
"""sha256 of each output, recorded through Cog's server at commit 68274ec (before the redesign)."""


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    with running_cog_server(tiny_weights, tmp_path_factory.mktemp("pinned") / "server.log") as running:
        yield running


def output_hashes(server, name: str) -> list[str]:
    inputs = dict(REQUESTS[name])
    for key in ("image", "map"):
        inputs[key] = data_uri((PINNED / inputs[key]).read_bytes())
    assert wait_until_ready(server.url)
    result = predict(server.url, inputs)
    assert result["status"] == "succeeded", result.get("error")
    return [hashlib.sha256(base64.b64decode(uri.split(",", 1)[1])).hexdigest() for uri in result["output"]]


@pytest.mark.parametrize("name", list(REQUESTS))
def test_the_same_request_gives_the_pinned_bytes(server, name):
    if GENERATES[name] and torch.backends.cpu.get_cpu_capability() != RECORDED_ON:
        pytest.skip(f"generated pixels pinned on {RECORDED_ON} kernels, this CPU runs others")
    assert output_hashes(server, name) == PINS[name]
