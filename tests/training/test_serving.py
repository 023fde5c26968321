"""Trainings through Cog's HTTP server in train mode (`--x-mode train`, as Cog's image serves /trainings): a training
returns a .tar that the predicting server takes as lora_weights (and, as a trained version's $COG_WEIGHTS, by
default); every hostile archive is refused in one line with the server READY after it and nothing left behind; a
cancelled training stops and leaves no output."""

import base64
import io
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from models.tooling.cog_server import (
    cancel,
    data_uri,
    file_server,
    predict,
    predict_async,
    running_cog_server,
    wait_until_ready,
    webhook_receiver,
)
from models.tooling.pictures import photo, png_bytes
from tests.support.photos import hostile_archives, training_photos, zip_of

pytestmark = pytest.mark.server

HOSTILE = hostile_archives()
TRAINING = {"steps": 8, "resolution": 256, "learning_rate": 0.01, "lora_rank": 4, "seed": 3, "sample_every": 4}


@pytest.fixture(scope="module")
def temporary(tmp_path_factory) -> Path:
    """The trainer's temporary folder ($TMPDIR), where Cog puts the uploads and the trainer its work and output."""
    return tmp_path_factory.mktemp("trainer-tmp")


@pytest.fixture(scope="module")
def trainer(tiny_weights, tmp_path_factory, temporary):
    log = tmp_path_factory.mktemp("trainer") / "server.log"
    with running_cog_server(tiny_weights, log, env={"TMPDIR": str(temporary)}, train=True) as running:
        yield running


def train(server, **inputs) -> dict:
    assert wait_until_ready(server.url)
    return predict(server.url, {**TRAINING, **inputs}, endpoint="trainings")


def photos_uri() -> str:
    return data_uri(zip_of(training_photos(scale=3)), "application/zip")


def test_a_training_returns_a_tar_that_the_predictor_uses(trainer, tiny_weights, tmp_path):
    answer = train(trainer, input_images=photos_uri())
    assert answer["status"] == "succeeded", answer.get("error")
    tar_bytes = base64.b64decode(answer["output"]["weights"].split(",", 1)[1])
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        names = sorted(tar.getnames())
    assert names == ["embeddings.pti", "lora.safetensors", "samples/step-00004.webp", "samples/step-00008.webp",
                     "special_params.json", "training.json"]  # fmt: skip
    assert (
        "step 8/8" in answer["logs"]
        and "sample at step 4" in answer["logs"]
        and "loss on the fixed draw" in answer["logs"]
    )
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "trained_model.tar").write_bytes(tar_bytes)
    white = png_bytes(np.full((48, 64), 255, np.uint8))
    edit = {"image": data_uri(png_bytes(photo(64, 48, seed=2))), "map": data_uri(white), "prompt": "a photo of TOK",
            "seed": 9, "output_format": "png"}  # fmt: skip
    env = {"ALLOW_PRIVATE_LORA_HOSTS": "1", "LORA_CACHE": str(tmp_path / "loras")}
    with file_server(tmp_path / "host") as host:
        url = f"{host}/trained_model.tar"
        with running_cog_server(tiny_weights, tmp_path / "predict.log", env=env) as server:
            plain = predict(server.url, edit)
            assert wait_until_ready(server.url)
            trained = predict(server.url, {**edit, "lora_weights": url})
        # A version made by a training on Replicate runs this image with $COG_WEIGHTS set to the training's output.
        trained_version = {**env, "COG_WEIGHTS": url, "LORA_CACHE": str(tmp_path / "loras-2")}
        with running_cog_server(tiny_weights, tmp_path / "version.log", env=trained_version) as server:
            by_default = predict(server.url, edit)
    assert plain["status"] == trained["status"] == by_default["status"] == "succeeded", trained.get("error")
    assert trained["output"] != plain["output"]
    assert "merged 1 LoRA(s)" in trained["logs"] and "trained tokens 'TOK' -> <s0><s1>" in trained["logs"]
    assert by_default["output"] == trained["output"]


@pytest.mark.parametrize("case", list(HOSTILE))
def test_each_hostile_archive_is_refused_in_one_line_and_the_server_stays_ready(trainer, temporary, case):
    content, words = HOSTILE[case]
    answer = train(trainer, input_images=data_uri(content, "application/octet-stream"))
    assert answer["status"] == "failed"
    assert words in answer["error"] and "\n" not in answer["error"].strip(), answer["error"]
    assert wait_until_ready(trainer.url)
    assert not list(temporary.glob("training-*"))  # the work folder is gone
    assert not list((temporary / "trainings").glob("*"))  # and no output, whole or partial


def test_a_cancelled_training_stops_and_leaves_no_output(trainer, temporary):
    with webhook_receiver() as receiver:
        training_id = predict_async(trainer.url, {**TRAINING, "input_images": photos_uri(), "steps": 10000},
                                    receiver.url, endpoint="trainings")  # fmt: skip
        deadline = time.monotonic() + 120
        while (
            "step " not in (update := receiver.updates.get(timeout=120)).get("logs", "") and time.monotonic() < deadline
        ):
            pass
        assert update.get("status") == "processing", update
        cancel(trainer.url, training_id, endpoint="trainings")
        final = receiver.final(training_id, timeout=60)
    assert final["status"] == "canceled" and final.get("output") is None
    assert wait_until_ready(trainer.url)
    assert not list(temporary.glob("training-*"))
    assert not list((temporary / "trainings").glob("*"))
