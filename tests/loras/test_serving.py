"""User LoRAs through Cog's HTTP server: every layout as a data URI and from a loopback HTTP server, exactness when
switched off, the cache, two at once, and bad input answered in one line with the server still serving."""

import base64
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save

from models.tooling.cog_server import (
    QuietHandler,
    data_uri,
    predict,
    running_cog_server,
    serving_in_thread,
    wait_until_ready,
)
from models.tooling.pictures import photo, png_bytes
from tests.support.loras import TARGETS, lora_file, trained_tokens, training_tar

pytestmark = pytest.mark.server

LAYOUTS = [  # (layout, kind, DoRA)
    ("kohya", "lora", False),
    ("kohya-sgm", "lora", False),
    ("peft", "lora", False),
    ("diffusers-old", "lora", False),
    ("attention-processor", "lora", False),
    ("eridiffusion-v2", "lora", False),
    ("eridiffusion-v2-full", "lora", False),
    ("eridiffusion-v1-sgm", "lora", False),
    ("eridiffusion-v1-diffusers", "lora", False),
    ("kohya", "loha", False),
    ("kohya", "lokr", False),
    ("kohya", "lora", True),
]


def lora_bytes(tiny_models, layout: str, kind: str = "lora", dora: bool = False, seed: int = 0) -> bytes:
    targets = TARGETS if layout == "kohya" else None
    tensors, header, _ = lora_file(tiny_models, layout, seed=seed, kind=kind, dora=dora, targets=targets)
    return save(tensors, header)


def lora_uri(content: bytes) -> str:
    return f"data:application/octet-stream;base64,{base64.b64encode(content).decode()}"


class CountingFiles:
    """A loopback file server that counts the requests for each path."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.requests: dict[str, int] = {}

    def handler(self):
        files = self

        class Handler(QuietHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(files.folder), **kwargs)

            def do_GET(self) -> None:
                files.requests[self.path] = files.requests.get(self.path, 0) + 1
                super().do_GET()

        return Handler


@pytest.fixture(scope="module")
def lora_host(tmp_path_factory, tiny_models):
    folder = tmp_path_factory.mktemp("lora-host")
    (folder / "style.safetensors").write_bytes(lora_bytes(tiny_models, "kohya", seed=11))
    (folder / "page.html").write_text("<html>Not Found</html>")
    trained = training_tar(lora_bytes(tiny_models, "peft", seed=12), trained_tokens((32, 32)))
    (folder / "trained.tar").write_bytes(trained)
    files = CountingFiles(folder)
    with serving_in_thread(files.handler()) as url:
        files.url = url
        yield files


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-server")
    env = {"ALLOW_PRIVATE_LORA_HOSTS": "1", "LORA_CACHE": str(folder / "loras")}
    with running_cog_server(tiny_weights, folder / "server.log", env=env) as running:
        yield running


@pytest.fixture(scope="module")
def request_files() -> dict:
    change_map = np.zeros((48, 64), np.uint8)
    change_map[:, 32:] = 255
    return {"image": data_uri(png_bytes(photo(64, 48, seed=2))), "map": data_uri(png_bytes(change_map))}


def edit(server, request_files, **inputs) -> dict:
    assert wait_until_ready(server.url)
    return predict(server.url, {**request_files, "seed": 9, "output_format": "png", **inputs})


def output_bytes(result: dict) -> bytes:
    assert result["status"] == "succeeded", result.get("error")
    return base64.b64decode(result["output"][0].split(",", 1)[1])


@pytest.fixture(scope="module")
def without_lora(server, request_files) -> bytes:
    return output_bytes(edit(server, request_files))


@pytest.mark.parametrize(
    ("layout", "kind", "dora"),
    LAYOUTS,
    ids=[f"{layout}-{kind}{'-dora' if dora else ''}" for layout, kind, dora in LAYOUTS],
)
def test_every_layout_changes_the_edit_and_leaves_no_trace(
    server, request_files, tiny_models, without_lora, layout, kind, dora
):
    result = edit(
        server, request_files, lora_weights=lora_uri(lora_bytes(tiny_models, layout, kind, dora)), lora_scale=2.0
    )
    assert output_bytes(result) != without_lora
    assert "lora_weights: " in result["logs"] and "merged 1 LoRA(s)" in result["logs"]
    assert output_bytes(edit(server, request_files)) == without_lora  # the reference weights, bit for bit


def test_scale_zero_is_no_lora(server, request_files, tiny_models, without_lora):
    result = edit(server, request_files, lora_weights=lora_uri(lora_bytes(tiny_models, "kohya")), lora_scale=0)
    assert output_bytes(result) == without_lora


def test_a_url_is_fetched_once_and_a_repeated_request_merges_nothing(server, request_files, lora_host):
    url = f"{lora_host.url}/style.safetensors"
    first = edit(server, request_files, lora_weights=url)
    second = edit(server, request_files, lora_weights=url)
    assert output_bytes(first) == output_bytes(second)
    assert lora_host.requests["/style.safetensors"] == 1
    assert "from the cache" in second["logs"] and "nothing to merge" in second["logs"]


def test_two_loras_at_once(server, request_files, tiny_models, lora_host, without_lora):
    extra = lora_uri(lora_bytes(tiny_models, "peft", seed=3))
    main = f"{lora_host.url}/style.safetensors"
    both = output_bytes(edit(server, request_files, lora_weights=main, extra_lora=extra, extra_lora_scale=1.5))
    alone = output_bytes(edit(server, request_files, lora_weights=main))
    assert len({both, alone, without_lora}) == 3


def test_a_replicate_training_tar_brings_its_lora_and_its_trained_tokens(
    server, request_files, lora_host, without_lora
):
    result = edit(server, request_files, lora_weights=f"{lora_host.url}/trained.tar", prompt="a photo of TOK")
    assert output_bytes(result) != without_lora
    assert "trained tokens 'TOK' -> <s0><s1>" in result["logs"]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (lambda host, tiny_models: {"lora_weights": f"{host}/missing.safetensors"}, "lora_weights: not found (404)"),
        (lambda host, tiny_models: {"lora_weights": f"{host}/page.html"}, "lora_weights: not a LoRA file"),
        (
            lambda host, tiny_models: {"extra_lora": lora_uri(b"\x80\x04\x95" + b"\0" * 40)},
            "extra_lora: this is a PyTorch",
        ),
        (
            lambda host, tiny_models: {"lora_weights": "file:///etc/passwd"},
            "lora_weights: file:// URLs are not accepted",
        ),
        (
            lambda host, tiny_models: {"lora_weights": "/src/model-cache/flash-lora/x.safetensors"},
            "lora_weights: local paths",
        ),
        (
            lambda host, tiny_models: {"lora_weights": "http://127.0.0.1:1/x.safetensors"},
            "lora_weights: cannot connect",
        ),
        (
            lambda host, tiny_models: {"lora_weights": lora_uri(save(sd15_tensors()))},
            "lora_weights: an SD 1.x/2.x LoRA",
        ),
        (lambda host, tiny_models: {"lora_scale": 5}, "lora_scale: must be from -1 to 3"),
    ],
    ids=["404", "html", "pickle", "file-url", "path", "unreachable", "sd15", "scale"],
)
def test_bad_lora_input_is_one_line_and_the_server_keeps_serving(
    server, request_files, tiny_models, lora_host, without_lora, inputs, message
):
    result = edit(server, request_files, **inputs(lora_host.url, tiny_models))
    assert result["status"] == "failed" and message in result["error"], result.get("error")
    assert "\n" not in result["error"].strip() and "Traceback" not in result["error"]
    assert output_bytes(edit(server, request_files)) == without_lora


def sd15_tensors() -> dict:
    import torch

    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    return {f"{prefix}.lora_down.weight": torch.zeros(4, 768), f"{prefix}.lora_up.weight": torch.zeros(320, 4)}


def test_the_cache_is_the_documented_folder(server):
    cache = Path(server.log_path).parent / "loras"
    assert list(cache.glob("*.safetensors")) and all(
        path.with_suffix(".json").is_file() for path in cache.glob("*.safetensors")
    )
