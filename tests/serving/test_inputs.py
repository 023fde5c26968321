"""Validation of every input: one clear line naming the input and what is allowed."""

import pytest
from cog import Secret

from models.errors import InputError
from models.inputs import EditOptions, LoraOptions, LoraRequest, OutputOptions
from models.limits import DEFAULT_PROMPT, MAX_SEED
from tests.support.editing import VALID


def options(**changes) -> EditOptions:
    return EditOptions.from_values({**VALID, **changes})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("steps", 0),
        ("steps", 17),
        ("steps", "4"),
        ("steps", 2.5),
        ("steps", True),
        ("steps", None),
        ("strength", -0.1),
        ("strength", 1.5),
        ("strength", float("nan")),
        ("strength", "high"),
        ("num_outputs", 0),
        ("num_outputs", 5),
        ("guidance_scale", -1),
        ("guidance_scale", 3.5),
        ("seed", -1),
        ("seed", MAX_SEED + 1),
        ("seed", "abc"),
        ("invert_map", "yes"),
        ("prompt", 42),
        ("prompt", "x" * 5000),
    ],
)
def test_bad_values_are_refused_with_the_input_named(name, value):
    with pytest.raises(InputError, match=rf"^{name}: "):
        options(**{name: value})


def test_integral_floats_are_accepted_as_whole_numbers():
    assert options(steps=4.0).steps == 4


def test_empty_prompt_gets_the_default():
    assert options(prompt="  ").prompt == DEFAULT_PROMPT


def test_missing_seed_is_drawn_at_random():
    seeds = {options(seed=None).seed for _ in range(5)}
    assert len(seeds) > 1 and all(0 <= seed <= MAX_SEED for seed in seeds)


@pytest.mark.parametrize(("given", "expected"), [("webp", "webp"), ("PNG", "png"), ("jpeg", "jpg")])
def test_output_formats(given, expected):
    assert OutputOptions.from_values({"output_format": given}).output_format == expected


@pytest.mark.parametrize(("fmt", "quality"), [("gif", 90), ("webp", 0), ("webp", 101)])
def test_bad_output_options(fmt, quality):
    with pytest.raises(InputError, match=r"^output_(format|quality): "):
        OutputOptions.from_values({"output_format": fmt, "output_quality": quality})


def test_lora_inputs_are_validated_and_tokens_never_shown():
    given = {"lora_weights": " https://x/a.safetensors ", "lora_scale": 0.5, "hf_api_token": Secret("hf_secret"),
             "civitai_api_token": "civitai_secret"}  # fmt: skip
    loras = LoraOptions.from_values(given)
    assert loras.loras == (LoraRequest("lora_weights", "https://x/a.safetensors", 0.5),)
    assert (loras.hf_api_token, loras.civitai_api_token) == ("hf_secret", "civitai_secret")
    assert "secret" not in repr(loras)
    assert LoraOptions.from_values({}).loras == () and LoraOptions.from_values({}).hf_api_token is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lora_scale": 3.5}, "lora_scale: must be from -1 to 3"),
        ({"extra_lora_scale": -2}, "extra_lora_scale: must be from -1 to 3"),
        ({"lora_weights": 7}, "lora_weights: must be text"),
        ({"hf_api_token": 7}, "hf_api_token: must be text"),
    ],
)
def test_bad_lora_inputs_are_one_line(changes, message):
    with pytest.raises(InputError, match=f"^{message}"):
        LoraOptions.from_values(changes)
