"""What `cog build` and `cog push` make of the project, checked short of running them (no Docker, no Cog CLI here):
one CUDA for cog.yaml and torch, the SDK pinned, the image's files, and the weight layers of a staged release."""

import re
import shutil
from pathlib import Path

import pytest
import yaml

from models.errors import FolderError, WeightsError
from models.tooling import release as stage_release

ROOT = Path(__file__).resolve().parents[2]

PYPI_TORCH_CUDA = {"2.13.0": "13.0"}
"""The CUDA that PyPI's Linux x86_64 wheel of each torch version is built for. 2.13.0: its metadata requires
cuda-toolkit 13.0.3 and nvidia-cudnn-cu13 (torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl.metadata, read on
2026-12-01). Add the CUDA of a new torch pin here, from the same file, before raising the pin."""

SERVING_FILES = [
    "LICENSE",
    "README.md",
    "cog.yaml",
    *sorted(
        path.relative_to(ROOT).as_posix() for path in (ROOT / "models").rglob("*.py") if "tooling" not in path.parts
    ),
    "predict.py",
    "requirements.txt",
    "scripts/download-weights",
    "train.py",
]


def requirement_lines(name: str) -> list[str]:
    lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def pins(name: str) -> dict[str, str]:
    return dict(line.split("==", 1) for line in requirement_lines(name) if "==" in line)


def test_cog_yaml_and_torch_agree_on_one_cuda():
    """Cog installs a torch outside its matrix from PyPI as pinned, with no index: PyPI's wheel decides the CUDA."""
    build = yaml.safe_load((ROOT / "cog.yaml").read_text(encoding="utf-8"))["build"]
    serving = requirement_lines("requirements.txt")
    assert not [line for line in serving if line.startswith("-") or " -" in line or "--" in line]  # no index options
    torch = pins("requirements.txt")["torch"]
    assert build["gpu"] is True and build["cuda"] == PYPI_TORCH_CUDA[torch]
    assert build["python_version"] == "3.11"  # the local CPU torch file and CI are Python 3.11


def test_ci_and_the_image_install_the_same_requirements():
    assert requirement_lines("requirements-dev.txt")[0] == "-r requirements.txt"
    assert not set(pins("requirements-dev.txt")) & set(pins("requirements.txt"))
    assert all(
        re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][0-9A-Za-z.+]*", line) for line in requirement_lines("requirements.txt")
    )


def test_the_cog_sdk_is_pinned_to_the_one_the_tests_run():
    """cog build strips cog and coglet from the requirements and installs build.sdk_version's SDK."""
    build = yaml.safe_load((ROOT / "cog.yaml").read_text(encoding="utf-8"))["build"]
    assert not {"cog", "coglet"} & set(pins("requirements.txt"))
    dev = pins("requirements-dev.txt")
    assert build["sdk_version"] == dev["cog"] == dev["coglet"]
    assert f"COGLET_WHEEL=pypi:{dev['coglet']}" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_docker_patterns_follow_dockers_rules(tmp_path):
    path = tmp_path / ".dockerignore"
    path.write_text("*\n!models/\n**/__pycache__\n!keep/**/*.txt\n", encoding="utf-8")
    rules = stage_release.ignore_patterns(path)
    ignored = {name: stage_release.is_ignored(name, rules) for name in (
        "x.py", "models/a.py", "models/__pycache__/a.pyc", "__pycache__", "keep/a/b/c.txt", "keep/c.txt", "keep/d.bin",
    )}  # fmt: skip
    assert ignored == {
        "x.py": True,
        "models/a.py": False,
        "models/__pycache__/a.pyc": True,
        "__pycache__": True,
        "keep/a/b/c.txt": False,
        "keep/c.txt": False,
        "keep/d.bin": True,
    }


def project_with_clutter(tmp_path: Path) -> Path:
    """The project's tracked files plus what a working folder gathers: a venv, weights, caches, outputs."""
    project = tmp_path / "project"
    tracked = [*SERVING_FILES, ".dockerignore", "tests/tooling/test_release.py", "docs/WEIGHTS.md", "scripts/benchmark"]
    for name in tracked:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, project / name)
    for clutter in (
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        "model-cache/unet/diffusion_pytorch_model.safetensors",
        "model-cache.downloads/models--x/blobs/abc",
        "model-cache.loras/0a1b.safetensors",
        "bench-weights/full/unet/diffusion_pytorch_model.safetensors",
        "outputs/smoke.webp",
        "models/__pycache__/pipeline.cpython-311.pyc",
        ".cog/openapi_schema.json",
    ):
        (project / clutter).parent.mkdir(parents=True, exist_ok=True)
        (project / clutter).write_bytes(b"x")
    return project


def test_the_image_holds_what_serving_needs_and_nothing_else(tmp_path):
    assert stage_release.image_files(project_with_clutter(tmp_path)) == sorted(SERVING_FILES)


@pytest.fixture
def big_file_threshold(monkeypatch):
    """Cog's 10 MB line at 100 kB, so that the tiny weights' model files count as weights (and the README not)."""
    monkeypatch.setattr(stage_release, "COG_WEIGHT_MIN_BYTES", 100_000)


def test_a_project_folder_would_push_its_clutter_as_weights(tmp_path, big_file_threshold):
    """Why releases are staged: --separate-weights walks the folder without reading .dockerignore."""
    project = project_with_clutter(tmp_path)
    (project / "bench-weights/full/unet/diffusion_pytorch_model.safetensors").write_bytes(b"x" * 100_000)
    assert "bench-weights/full/unet" in stage_release.weight_layers(project)


def test_a_staged_release_has_the_serving_files_and_each_weights_folder_as_a_layer(
    tmp_path, tiny_weights, big_file_threshold
):
    dest = tmp_path / "release"
    layers = stage_release.stage(tiny_weights, dest)
    weight_files = sorted(
        f"model-cache/{path.relative_to(tiny_weights).as_posix()}" for path in tiny_weights.rglob("*") if path.is_file()
    )
    assert stage_release.image_files(dest) == sorted(SERVING_FILES + weight_files)
    assert set(layers) == {
        "model-cache/flash-lora",
        "model-cache/map_depth",
        "model-cache/map_segmentation",
        "model-cache/safety_checker",
        "model-cache/text_encoder",
        "model-cache/text_encoder_2",
        "model-cache/unet",
        "model-cache/vae",
    }
    assert (dest / "model-cache" / "unet" / "config.json").stat().st_ino == (
        tiny_weights / "unet" / "config.json"
    ).stat().st_ino
    stage_release.stage(tiny_weights, dest)  # staging again replaces the earlier stage


def test_staging_refuses_damaged_weights_and_foreign_folders(tmp_path, tiny_weights):
    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    (weights / "vae" / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="does not match its manifest"):
        stage_release.stage(weights, tmp_path / "release")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(FolderError, match="not made by stage-release"):
        stage_release.stage(tiny_weights, tmp_path / "photos")
