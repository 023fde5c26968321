"""scripts/train: the trainer's inputs as flags (--images for input_images), the Cog trainer's .tar and its
validation, exit statuses, and nothing written on failure."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from models.training.inputs import TRAINING_INPUTS
from tests.support.photos import training_photos, zip_of

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # each test runs the command in a process of its own


def train(*flags: str, weights: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train"), "--weights", str(weights), *flags],
        capture_output=True, text=True, env=environment, timeout=600, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def photos_zip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli-train") / "photos.zip"
    path.write_bytes(zip_of(training_photos(scale=3)))
    return path


def test_a_training_writes_the_tar_and_prints_its_path(photos_zip, tmp_path, tiny_weights):
    out = tmp_path / "my-lora.tar"
    done = train("--images", str(photos_zip), "--out", str(out), "--steps", "3", "--resolution", "256",
                 "--sample-every", "0", "--lora-rank", "2", "--seed", "4", weights=tiny_weights)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    with tarfile.open(out) as tar:
        assert {"lora.safetensors", "embeddings.pti", "special_params.json", "training.json"} <= set(tar.getnames())
    assert "training seed: 4" in done.stderr and "step 3/3" in done.stderr


@pytest.mark.parametrize(
    ("flags", "words"),
    [(["--resolution", "300"], "train: resolution: must be a multiple of 64"),
     (["--token", "a b"], "train: token: one word"), (["--steps", "many"], "train: steps: must be a whole number")],
)  # fmt: skip
def test_a_bad_value_gets_the_trainers_line_and_status_2(photos_zip, tmp_path, tiny_weights, flags, words):
    out = tmp_path / "never.tar"
    done = train("--images", str(photos_zip), "--out", str(out), *flags, weights=tiny_weights)
    assert done.returncode == 2 and words in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_folder_as_out_is_refused_before_training(photos_zip, tmp_path, tiny_weights):
    done = train("--images", str(photos_zip), "--out", str(tmp_path), weights=tiny_weights)
    assert done.returncode == 2 and "is a folder" in done.stderr and "step " not in done.stderr, done.stderr


def test_a_hostile_archive_is_refused_and_nothing_is_written(tmp_path, tiny_weights):
    archive = tmp_path / "evil.zip"
    archive.write_bytes(zip_of({"../escape.png": b"x"}))
    done = train("--images", str(archive), "--out", str(tmp_path / "never.tar"), weights=tiny_weights)
    assert done.returncode == 2 and "points outside the archive's folder" in done.stderr, done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["evil.zip"]


def test_every_input_is_a_flag():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train"), "--help"], capture_output=True, text=True,
                          cwd=ROOT, check=True)  # fmt: skip
    for name in TRAINING_INPUTS:
        assert "--" + name.replace("_", "-") in done.stdout, name
    assert "--images" in done.stdout
