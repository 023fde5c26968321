"""The safety checker on what is returned: flagged outputs left out, all flagged fails in one line, the crop checked
at its own resolution, nothing checked when nothing was generated or when it is disabled; through Cog's server too."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from models.editor import edit_files
from models.errors import SafetyError
from models.inputs import EditOptions
from models.tooling.cog_server import data_uri, predict, running_cog_server, wait_until_ready
from models.tooling.pictures import photo, png_bytes
from models.weights.manifest import read_manifest, write_manifest


def options(**changes) -> EditOptions:
    values = {"prompt": "a red boat", "negative_prompt": "", "steps": 1, "strength": 1.0, "invert_map": False,
              "guidance_scale": 0.0, "num_outputs": 2, "seed": 5}  # fmt: skip
    return EditOptions.from_values({**values, **changes})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("safety")
    change_map = np.zeros((96, 128), np.uint8)
    change_map[:, 64:] = 255
    image, half, black = folder / "image.png", folder / "half.png", folder / "black.png"
    Image.fromarray(photo(128, 96, seed=2)).save(image)
    Image.fromarray(change_map).save(half)
    Image.fromarray(np.zeros_like(change_map)).save(black)
    return image, half, black


@pytest.fixture
def checker(pipeline, monkeypatch):
    """The session pipeline's checker, its thresholds restored after each test, its calls recorded."""
    model = pipeline.safety.model
    saved = (model.concept_embeds_weights.clone(), model.special_care_embeds_weights.clone())
    calls = []
    flags = pipeline.safety.flags
    monkeypatch.setattr(pipeline.safety, "flags", lambda pictures: calls.append(pictures) or flags(pictures))
    yield pipeline.safety, calls
    with torch.no_grad():
        model.concept_embeds_weights.copy_(saved[0])
        model.special_care_embeds_weights.copy_(saved[1])


def concept_scores(safety, pictures) -> torch.Tensor:
    """Cosine similarity of each picture's CLIP embedding with each concept (pictures x 17): what the thresholds are
    compared with."""
    with torch.inference_mode():
        pooled = safety.model.vision_model(safety.clip_input(pictures))[1]
        embeds = torch.nn.functional.normalize(safety.model.visual_projection(pooled))
        return embeds @ torch.nn.functional.normalize(safety.model.concept_embeds).t()


def test_a_flagged_output_is_left_out_and_logged(pipeline, checker, files, caplog):
    safety, calls = checker
    image, half, _ = files
    both = edit_files(pipeline, image, half, options(disable_safety_checker=True)).images
    all_scores = concept_scores(safety, both)
    concept = int((all_scores[0] - all_scores[1]).abs().argmax())
    scores = all_scores[:, concept]
    assert abs(scores[0] - scores[1]) > 0.0015  # diffusers rounds each score to 3 decimals
    with torch.no_grad():  # a threshold between the two: only the output that scores higher is flagged
        safety.model.concept_embeds_weights[concept] = float(scores.mean())
    with caplog.at_level(logging.WARNING, logger="models.editor"):
        result = edit_files(pipeline, image, half, options())
    kept = int(scores.argmin())
    assert len(result.images) == 1 and np.array_equal(result.images[0], both[kept])
    assert "safety checker: 1 of 2 outputs flagged as possibly NSFW and left out" in caplog.text
    assert len(calls[-1]) == 2 and "safety_check" in result.timings  # one run, on the whole batch


def test_every_output_flagged_fails_in_one_line(pipeline, checker, files):
    safety, _ = checker
    image, half, _ = files
    with torch.no_grad():
        safety.model.concept_embeds_weights.fill_(-1.5)
    with pytest.raises(SafetyError, match=r"^the safety checker flagged all 2 outputs as possibly NSFW; try another"):
        edit_files(pipeline, image, half, options())


def test_disabled_or_nothing_generated_means_no_check(pipeline, checker, files):
    safety, calls = checker
    image, half, black = files
    with torch.no_grad():
        safety.model.concept_embeds_weights.fill_(-1.5)
    assert len(edit_files(pipeline, image, half, options(disable_safety_checker=True)).images) == 2
    assert len(edit_files(pipeline, image, black, options()).images) == 2  # an all-black map: the input itself
    assert calls == []


def test_an_edit_made_on_a_crop_is_checked_at_the_crop_s_resolution_too(pipeline, checker, tmp_path):
    _, calls = checker
    pixels = photo(3000, 2000, seed=3)
    change_map = np.zeros((2000, 3000), np.uint8)
    change_map[900:1100, 1400:1600] = 255
    image, mask = tmp_path / "large.png", tmp_path / "mask.png"
    Image.fromarray(pixels).save(image, compress_level=1)
    Image.fromarray(change_map).save(mask)
    result = edit_files(pipeline, image, mask, options(num_outputs=1))
    [pictures] = calls
    assert [picture.shape for picture in pictures] == [(2000, 3000, 3), result.crop_images[0].shape]
    assert result.crop_images[0].shape == (512, 512, 3)  # 200 px and 100 px of context, grown to 512


def flag_everything(source: Path, target: Path) -> Path:
    """A copy of the weights whose checker flags every picture (its concept thresholds below any similarity)."""
    shutil.copytree(source, target)
    path = target / "safety_checker" / "model.safetensors"
    tensors = load_file(path)
    tensors["concept_embeds_weights"] = torch.full_like(tensors["concept_embeds_weights"], -1.5)
    save_file(tensors, path, {"format": "pt"})
    manifest = read_manifest(target)
    write_manifest(target, manifest.sources, manifest.lora)
    return target


@pytest.mark.server
def test_through_cog_s_server_flagged_outputs_fail_and_disabling_skips_the_check(tiny_weights, tmp_path):
    weights = flag_everything(tiny_weights, tmp_path / "flagging" / "model-cache")
    change_map = np.zeros((48, 64), np.uint8)
    change_map[:, 32:] = 255
    request = {"image": data_uri(png_bytes(photo(64, 48))), "map": data_uri(png_bytes(change_map)), "steps": 1}
    with running_cog_server(weights, tmp_path / "server.log") as server:
        flagged = predict(server.url, request)
        assert flagged["status"] == "failed"
        assert flagged["error"].endswith("the safety checker flagged the output as possibly NSFW; try another prompt,"
                                         " seed or map (API callers can set disable_safety_checker)")  # fmt: skip
        assert wait_until_ready(server.url)
        allowed = predict(server.url, {**request, "disable_safety_checker": True})
        assert allowed["status"] == "succeeded", allowed.get("error")
        assert "safety_check" not in allowed["logs"]
        assert wait_until_ready(server.url)
        assert predict(server.url, {**request, "map": data_uri(png_bytes(np.zeros_like(change_map)))})["status"] == (
            "succeeded"
        )  # an all-black map generates nothing: nothing to check
