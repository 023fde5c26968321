"""Training photos: aspect buckets, the fit to a bucket, captions into prompts, and the objective's weights."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from models.tooling.pictures import photo
from models.training.photos import buckets, fit_to_bucket, nearest_bucket, prompt_of
from models.training.trainer import MASK_FLOOR, MIN_SNR_GAMMA, batches, min_snr_weights, subject_weights


@pytest.mark.parametrize("resolution", [256, 512, 1024, 1536])
def test_buckets_are_multiples_of_64_of_at_most_the_area_from_1_to_2_5(resolution):
    found = buckets(resolution)
    assert (resolution, resolution) in found
    for height, width in found:
        assert height % 64 == 0 and width % 64 == 0 and height * width <= resolution**2
        assert 1 / 2.5 <= width / height <= 2.5


@pytest.mark.parametrize(
    ("size", "bucket"),
    [((3000, 4000), (896, 1152)), ((4000, 3000), (1152, 896)), ((1000, 1000), (1024, 1024)),
     ((1080, 1920), (768, 1344)), ((500, 5000), (640, 1600))],
)  # fmt: skip
def test_each_picture_goes_to_the_bucket_nearest_its_aspect(size, bucket):
    assert nearest_bucket(*size, 1024) == bucket
    aspect = math.log(size[1] / size[0])
    assert all(abs(math.log(w / h) - aspect) >= abs(math.log(bucket[1] / bucket[0]) - aspect) - 1e-12
               for h, w in buckets(1024))  # fmt: skip


def test_a_picture_is_scaled_to_cover_its_bucket_and_centre_cropped():
    pixels = photo(300, 200)
    fitted, corner = fit_to_bucket(pixels, (128, 256))
    assert fitted.shape == (128, 256, 3) and corner == (21, 0)  # 300x200 -> 256x171, 21 rows cut above


@pytest.mark.parametrize(
    ("caption", "expected"),
    [(None, "a photo of TOK"), ("on a beach", "a photo of TOK, on a beach"), ("TOK on a beach", "TOK on a beach")],
)
def test_captions_become_prompts(caption, expected):
    assert prompt_of(caption, "a photo of TOK,", "TOK") == expected


def test_subject_weights_keep_a_floor_and_a_mean_of_one():
    probabilities = torch.zeros(8, 8)
    probabilities[:, :4] = 1
    weights = subject_weights(probabilities)
    assert float(weights.mean()) == pytest.approx(1.0)
    assert float(weights[0, 0] / weights[0, 7]) == pytest.approx(1 / MASK_FLOOR)
    assert torch.allclose(subject_weights(torch.zeros(4, 4)), torch.ones(4, 4))  # nothing found: trains evenly


def test_min_snr_weights_damp_only_the_nearly_clean_timesteps():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = torch.tensor([0, 50, 200, 999])
    weights = min_snr_weights(scheduler, timesteps)
    snr = scheduler.alphas_cumprod[timesteps] / (1 - scheduler.alphas_cumprod[timesteps])
    assert torch.allclose(weights, torch.where(snr > MIN_SNR_GAMMA, MIN_SNR_GAMMA / snr, torch.ones(4)))
    assert weights[0] < 0.01 and weights[-1] == 1


def test_batches_hold_one_bucket_and_every_photo_once_an_epoch():
    sizes = [(64, 64), (64, 128), (64, 64), (64, 64), (64, 128)]
    order = batches(sizes, 2, torch.Generator().manual_seed(0))
    epoch = [next(order) for _ in range(3)]  # 3 same-size photos make 2 batches, 2 others make 1
    assert sorted(index for batch in epoch for index in batch) == [0, 1, 2, 3, 4]
    assert all(len({sizes[index] for index in batch}) == 1 for batch in epoch)
    again = batches(sizes, 2, torch.Generator().manual_seed(0))
    assert [next(again) for _ in range(3)] == epoch
    assert np.all([len(batch) <= 2 for batch in epoch])
