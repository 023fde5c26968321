"""scripts/edit: the predictor's inputs as flags, its validation and its bytes, local files, exit statuses."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cog import Path as CogPath
from PIL import Image
from safetensors.torch import save

from models.errors import InputError
from models.inputs import INPUTS, REQUIRED, EditOptions
from models.loras.cache import LoraCache
from models.service import EditService
from models.tooling.pictures import photo
from predict import Predictor
from tests.support.loras import lora_file

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # each test runs the command in a process of its own


def edit(*flags: str, weights: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "edit"), "--weights", str(weights), *flags],
        capture_output=True, text=True, env=environment, timeout=600, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cli")
    change_map = np.zeros((48, 64), np.uint8)
    change_map[:, 32:] = 200
    image, mask = folder / "photo.png", folder / "map.png"
    Image.fromarray(photo(64, 48, seed=12)).save(image)
    Image.fromarray(change_map).save(mask)
    return image, mask


def run_predictor(pipeline, folder: Path, image: Path, mask: Path, **inputs) -> list[Path]:
    """Predictor.run in this process, with Cog's defaults for the inputs not given, on files as Cog leaves them."""
    import tempfile

    predictor = Predictor()
    predictor.service = EditService(pipeline, LoraCache(folder / "loras"))
    predictor.output_dir = folder / "outputs"
    temporary = Path(tempfile.gettempdir())
    fetched = []
    for path in (image, mask):
        copy = temporary / f"tmp-cli-{os.getpid()}-{path.name}"
        copy.write_bytes(path.read_bytes())
        fetched.append(CogPath(copy))
    defaults = {name: spec.default for name, spec in INPUTS.items() if spec.default is not REQUIRED}
    defaults["prompt"] = "a red boat"  # as Cog passes them: every input, the seed unset (None)
    try:
        return predictor.run(**{**defaults, "image": fetched[0], "map": fetched[1], **inputs})
    finally:
        for path in fetched:
            Path(path).unlink(missing_ok=True)


@pytest.mark.parametrize("output_format", ["webp", "png"])
def test_the_same_inputs_and_seed_give_the_same_bytes_as_the_predictor(
    pipeline, tiny_weights, inputs, tmp_path, output_format
):
    image, mask = inputs
    [expected] = run_predictor(pipeline, tmp_path, image, mask, seed=21, output_format=output_format, map_blur=3)
    out = tmp_path / f"edited.{output_format}"
    result = edit("--prompt", "a red boat", "--image", str(image), "--map", str(mask), "--seed", "21", "--map-blur",
                  "3", "--out", str(out), weights=tiny_weights)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert out.read_bytes() == Path(expected).read_bytes()
    assert "seed: 21" in result.stderr and "denoising" in result.stderr and "wrote 1 picture(s)" in result.stderr


def test_several_outputs_go_to_a_folder_and_quiet_prints_only_their_paths(tiny_weights, inputs, tmp_path):
    image, mask = inputs
    flags = ["--num-outputs", "2", "--seed", "4", "--steps", "1", "--quiet", "--output-format", "png"]
    result = edit(
        "--image", str(image), "--map", str(mask), *flags, "--out", str(tmp_path / "edits"), weights=tiny_weights
    )
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.split()]
    assert paths == [tmp_path / "edits" / "photo-4-0.png", tmp_path / "edits" / "photo-4-1.png"]
    assert all(path.is_file() for path in paths)
    assert "seed" not in result.stderr and "denoising" not in result.stderr


def test_map_flags_outpaint_without_a_map_and_write_the_map_beside_the_picture(tiny_weights, inputs, tmp_path):
    image, _ = inputs
    out = tmp_path / "wider.png"
    flags = ["--extend-right", "16", "--map-depth", "far", "--return-map", "--steps", "1", "--seed", "2", "--quiet"]
    result = edit("--image", str(image), *flags, "--out", str(out), weights=tiny_weights)
    assert result.returncode == 0, result.stderr
    assert [Path(line) for line in result.stdout.split()] == [out, tmp_path / "wider-map.png"]
    assert Image.open(out).size == (80, 48)
    written_map = Image.open(tmp_path / "wider-map.png")
    assert written_map.size == (80, 48) and written_map.mode == "I;16"


@pytest.mark.parametrize(
    ("flags", "inputs_for_predictor"),
    [
        (["--steps", "17"], {"steps": 17}),
        (["--steps", "many"], {"steps": "many"}),
        (["--strength", "1.5"], {"strength": 1.5}),
        (["--guidance-scale", "7"], {"guidance_scale": 7}),
        (["--map-grow", "300"], {"map_grow": 300}),
    ],
)
def test_a_bad_input_exits_2_with_the_predictor_s_own_message(tiny_weights, inputs, flags, inputs_for_predictor):
    image, mask = inputs
    base = {"prompt": "x", "negative_prompt": "", "steps": 4, "strength": 1.0, "invert_map": False,
            "guidance_scale": 0.0, "num_outputs": 1, "seed": 1}  # fmt: skip
    with pytest.raises(InputError) as predictor_error:
        EditOptions.from_values({**base, **inputs_for_predictor})
    result = edit("--image", str(image), "--map", str(mask), *flags, weights=tiny_weights)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"edit: {predictor_error.value}"


def test_files_are_local_paths_and_missing_ones_are_named(tiny_weights, inputs, tmp_path):
    image, _ = inputs
    result = edit("--image", str(image), "--map", str(tmp_path / "nothing.png"), weights=tiny_weights)
    assert result.returncode == 2 and result.stderr.strip().endswith(
        f"edit: map: no such file: {tmp_path / 'nothing.png'}"
    )


def test_a_local_lora_file_is_used(tiny_models, tiny_weights, inputs, tmp_path):
    image, mask = inputs
    tensors, header, _ = lora_file(tiny_models, "kohya")
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(save(tensors, header))
    result = edit("--image", str(image), "--map", str(mask), "--steps", "1", "--lora-weights", str(lora),
                  "--out", str(tmp_path / "out.webp"), weights=tiny_weights)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"lora_weights: using the local file {lora}" in result.stderr and "merged 1 LoRA(s)" in result.stderr


def test_missing_weights_offline_name_the_command(inputs, tmp_path):
    image, mask = inputs
    result = edit("--image", str(image), "--map", str(mask), weights=tmp_path / "model-cache")
    assert result.returncode == 1
    [line] = [line for line in result.stderr.splitlines() if line.startswith("edit: ")]
    assert "no model weights in" in line and "python scripts/download-weights" in line


def test_cuda_asked_for_without_a_gpu_is_one_line(tiny_weights, inputs):
    image, mask = inputs
    result = edit("--image", str(image), "--map", str(mask), "--device", "cuda", weights=tiny_weights,
                  env={"CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == "edit: device: cuda asked for, but PyTorch sees no CUDA GPU; use auto or cpu"
    )
