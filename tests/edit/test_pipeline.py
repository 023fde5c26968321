"""The edit on tiny random weights: the behaviours the product promises, through the real code paths."""

import io
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, TCDScheduler
from PIL import Image

from models import pipeline as pipeline_module
from models import sampler
from models.accelerators import ACCELERATORS
from models.errors import NumericError
from models.maps import shaping
from models.pictures.write import encode_image
from models.sizing import working_size
from models.tooling.pictures import photo
from models.weights.load import load_pipeline, select_device
from tests.support.editing import changed_amount, edit, half_map


def test_kept_pixels_are_selected_so_nan_cannot_reach_them(pipeline):
    """The composite takes kept pixels from the input by selection: a generated picture of NaN leaves them exact."""
    image = torch.tensor(photo(64, 48), dtype=torch.float32).permute(2, 0, 1)[None]
    work_map = torch.zeros(48, 64)
    work_map[:, 40:] = 1.0
    [composite] = pipeline._composite(image, torch.full_like(image, float("nan")), work_map)
    keep_until = 40 - 2 * shaping.FEATHER_PX - 1
    assert np.array_equal(composite[:, :keep_until], photo(64, 48)[:, :keep_until])


def test_a_non_finite_value_in_an_edit_fails_it_in_one_line_and_returns_nothing(pipeline, monkeypatch):
    """Any cause (here the UNet itself): the decode's check stops the edit before a picture is made."""
    real_forward = pipeline.unet.forward

    def overflowing(*args, **kwargs):
        output = real_forward(*args, **kwargs)
        output[0].fill_(float("inf"))
        return output

    monkeypatch.setattr(pipeline.unet, "forward", overflowing)
    with pytest.raises(NumericError, match=r"^the edit produced NaN or infinite values, so no picture is returned"):
        edit(pipeline, photo(64, 48), half_map(48, 64), seed=1)


def test_black_keeps_exactly_and_white_changes(pipeline):
    image = photo(640, 480)
    [output] = edit(pipeline, image, half_map(480, 640), seed=1)
    assert output.shape == image.shape and output.dtype == np.uint8
    scale = 640 / working_size(640, 480)[0]
    keep_until = 320 - int(np.ceil(2 * shaping.FEATHER_PX * scale)) - 2
    assert np.array_equal(output[:, :keep_until], image[:, :keep_until])
    assert changed_amount(output[:, 340:], image[:, 340:]) > 10


def test_exact_keep_survives_png_output_byte_for_byte(pipeline, tmp_path):
    image = photo(512, 384, seed=3)
    [output] = edit(pipeline, image, half_map(384, 512), seed=2)
    decoded = np.asarray(Image.open(io.BytesIO(encode_image(output, "png", 90))))
    assert np.array_equal(decoded[:, :200], image[:, :200])


def test_border_between_kept_and_changed_is_feathered(pipeline):
    image = photo(1024, 1024, seed=4)
    [output] = edit(pipeline, image, half_map(1024, 1024), seed=3)
    per_column = np.abs(output.astype(np.int16) - image).mean(axis=(0, 2))
    kept, changed = per_column[: 512 - 2 * shaping.FEATHER_PX].max(), per_column[512:].mean()
    band = per_column[512 - 2 * shaping.FEATHER_PX : 512]
    assert kept == 0
    assert (band > 0).sum() >= shaping.FEATHER_PX, "the change fades in over the band"
    assert band.max() - band.min() > 0.25 * changed, "a ramp, not a step"


def test_map_values_are_not_quantised_to_the_step_count(pipeline):
    image = photo(512, 512, seed=5)
    [low] = edit(pipeline, image, np.full((512, 512), 0.30), seed=4)
    [high] = edit(pipeline, image, np.full((512, 512), 0.35), seed=4)
    assert not np.array_equal(low, high)


def test_change_grows_with_the_map_value(pipeline):
    """Random weights saturate early (any real weight on their estimate looks like noise), so this checks
    the low range; tests/edit/test_sampler.py checks the whole range with an ideal denoiser."""
    image = photo(512, 512, seed=6)
    amounts = [
        changed_amount(edit(pipeline, image, np.full((512, 512), value), seed=5)[0], image)
        for value in (0.0, 0.01, 0.03, 0.06)
    ]
    assert all(later > earlier for earlier, later in itertools.pairwise(amounts)), amounts


def test_all_black_returns_the_input_unchanged(pipeline):
    image = photo(300, 200)
    outputs = edit(pipeline, image, np.zeros((200, 300)), seed=1, num_outputs=2)
    assert all(np.array_equal(output, image) for output in outputs)


def test_all_white_at_full_strength_is_diffusers_img2img(pipeline):
    """Same prompt, seed and starting latents: our output equals StableDiffusionXLImg2ImgPipeline's."""
    image = photo(1024, 1024, seed=7)
    [ours] = edit(pipeline, image, np.ones((1024, 1024)), seed=11)

    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    with torch.inference_mode():
        latents = pipeline._encode_image(pixels)
    reference = pipeline.sdxl(
        prompt="a red boat",
        image=latents,
        strength=1.0,
        timesteps=list(sampler.flash_timesteps(4)),
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(11),
        output_type="np",
    ).images[0]
    reference = np.round(reference * 255).astype(np.int16)
    assert np.abs(reference - ours).max() <= 2


def test_same_seed_same_bytes_and_batch_images_differ(pipeline):
    image, change_map = photo(400, 300), half_map(300, 400)
    first = edit(pipeline, image, change_map, seed=9, num_outputs=2)
    again = edit(pipeline, image, change_map, seed=9, num_outputs=2)
    other = edit(pipeline, image, change_map, seed=10, num_outputs=1)
    assert encode_image(first[0], "webp", 90) == encode_image(again[0], "webp", 90)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], first[1])
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("size", [(333, 500), (1600, 400), (1, 1)])
def test_any_size_comes_back_at_the_input_size(pipeline, size):
    width, height = size
    [output] = edit(pipeline, photo(width, height), np.ones((height, width)), seed=1)
    assert output.shape == (height, width, 3)


def test_guidance_above_one_uses_the_negative_prompt(pipeline):
    image, change_map = photo(256, 256), np.ones((256, 256))
    plain = edit(pipeline, image, change_map, seed=1, guidance_scale=3.0)
    negative = edit(pipeline, image, change_map, seed=1, guidance_scale=3.0, negative_prompt="blurry")
    assert not np.array_equal(plain[0], negative[0])


def test_device_is_cuda_in_bf16_when_available_else_cpu_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device() == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert select_device() == (torch.device("cuda"), torch.bfloat16)


@contextmanager
def model_inputs(pipeline, record: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call record(name, first input) on every UNet, VAE encoder and VAE decoder call inside the block."""
    models = {"unet": pipeline.unet, "encoder": pipeline.vae.encoder, "decoder": pipeline.vae.decoder}
    hooks = [
        model.register_forward_pre_hook(lambda module, args, name=name: record(name, args[0]))
        for name, model in models.items()
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def test_gpu_dtype_runs_every_model_in_bf16_with_no_vae_upcast(tiny_weights):
    """The GPU path's dtype, run here on a CPU: UNet and both VAE passes see bf16 inputs, and black still keeps."""
    pipeline = load_pipeline(tiny_weights, torch.device("cpu"), torch.bfloat16)
    seen: dict[str, set[torch.dtype]] = {}
    image = photo(320, 240)
    with model_inputs(pipeline, lambda name, tensor: seen.setdefault(name, set()).add(tensor.dtype)):
        outputs = edit(pipeline, image, half_map(240, 320), seed=4, num_outputs=2)
    assert seen == {"unet": {torch.bfloat16}, "encoder": {torch.bfloat16}, "decoder": {torch.bfloat16}}
    for output in outputs:
        assert output.shape == image.shape
        assert np.array_equal(output[:, :100], image[:, :100])
        assert changed_amount(output[:, 200:], image[:, 200:]) > 10


HOST_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
"""Tensor methods that make the host wait for the device: none may run inside the denoising loop."""


def test_denoising_loop_never_waits_for_the_device(pipeline, monkeypatch):
    in_loop, syncs = [False], []
    sample = pipeline_module.sampler.sample

    def watched_sample(*args, **kwargs):
        in_loop[0] = True
        try:
            return sample(*args, **kwargs)
        finally:
            in_loop[0] = False

    def recording(method, name):
        def call(tensor, *args, **kwargs):
            if in_loop[0]:
                syncs.append(name)
            return method(tensor, *args, **kwargs)

        return call

    monkeypatch.setattr(pipeline_module.sampler, "sample", watched_sample)
    for name in HOST_SYNCS:
        monkeypatch.setattr(torch.Tensor, name, recording(getattr(torch.Tensor, name), name))
    edit(pipeline, photo(256, 256), half_map(256, 256), seed=5, num_outputs=2)
    assert syncs == []


def test_outputs_share_one_vae_encode_and_go_through_the_unet_as_one_batch(pipeline):
    batches: dict[str, list[int]] = {}
    with model_inputs(pipeline, lambda name, tensor: batches.setdefault(name, []).append(len(tensor))):
        edit(pipeline, photo(256, 256), half_map(256, 256), seed=6, num_outputs=3)
    assert batches == {"unet": [3, 3, 3, 3], "encoder": [1], "decoder": [3]}


@pytest.mark.parametrize(
    ("name", "scheduler_class", "options"),
    [("lightning", EulerDiscreteScheduler, {"timestep_spacing": "trailing"}), ("tcd", TCDScheduler, {})],
)
def test_all_white_at_full_strength_is_diffusers_img2img_with_each_accelerator_s_scheduler(
    pipeline, monkeypatch, name, scheduler_class, options
):
    """The same UNet under each accelerator's step rule against StableDiffusionXLImg2ImgPipeline with the scheduler
    its model card names (TCD with its gamma, 0.3), the same seed and starting latents: within 2 of 255 (measured: 1
    for both). Not bitwise: Euler steps in sigma space, and TCD's last diffusers step leaves 2.9% of the predicted
    noise in (it returns x at timestep 0, the sampler x0)."""
    monkeypatch.setattr(pipeline, "accelerator", ACCELERATORS[name])
    image = photo(1024, 1024, seed=7)
    [ours] = edit(pipeline, image, np.ones((1024, 1024)), seed=11)
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    with torch.inference_mode():
        latents = pipeline._encode_image(pixels)
    scheduler = scheduler_class.from_config(pipeline.sdxl.scheduler.config, **options)
    reference_pipeline = StableDiffusionXLImg2ImgPipeline(**{**pipeline.sdxl.components, "scheduler": scheduler})
    reference_pipeline.set_progress_bar_config(disable=True)
    reference = reference_pipeline(
        prompt="a red boat",
        image=latents,
        strength=1.0,
        num_inference_steps=4,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(11),
        output_type="np",
        **({"eta": ACCELERATORS[name].gamma} if name == "tcd" else {}),
    ).images[0]
    assert np.abs(np.round(reference * 255).astype(np.int16) - ours).max() <= 2
