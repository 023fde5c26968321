"""models/loras/tokens.py: the new tokens a LoRA was trained with (a Replicate training's embeddings.pti and
special_params.json, OneTrainer's bundled embeddings) added for a request, their word replaced in the prompt, and the
tokenizers and text encoders restored exactly afterwards."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save, save_file

from models.editor import edit_files
from models.errors import InputError
from models.inputs import EditOptions, LoraOptions
from models.loras.cache import LoraCache
from models.loras.request import use_loras
from models.loras.tokens import read_tokens_file
from models.tooling.pictures import photo
from tests.support.loras import lora_file, trained_tokens, training_tar

WIDTHS = (32, 32)
"""The tiny text encoders' widths."""


@pytest.fixture
def fresh_pipeline(tiny_weights):
    from models.weights.load import load_pipeline

    return load_pipeline(tiny_weights, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def lora(tiny_models) -> bytes:
    tensors, header, _ = lora_file(tiny_models, "kohya", seed=9)
    return save(tensors, header)


def write(path, content: bytes):
    path.write_bytes(content)
    return path


def use(pipeline, path, cache: LoraCache) -> None:
    use_loras(pipeline, LoraOptions.from_values({"lora_weights": str(path) if path else ""}), cache, allow_paths=True)


def prompt_embeddings(pipeline, prompt: str) -> torch.Tensor:
    embeds, _, pooled, _ = pipeline.sdxl.encode_prompt(
        prompt=pipeline.tokens.rewrite(prompt), device="cpu", do_classifier_free_guidance=False
    )
    return torch.cat([embeds.flatten(), pooled.flatten()])


def test_a_training_s_tokens_are_kept_beside_its_lora_in_the_cache(tmp_path, lora):
    from models.loras.fetch import fetch_lora

    embeddings = trained_tokens(WIDTHS)
    archive = write(tmp_path / "training.tar", training_tar(lora, embeddings))
    cache = LoraCache(tmp_path / "cache")
    path = fetch_lora("lora_weights", str(archive), hf_token=None, civitai_token=None, cache=cache, allow_paths=True)
    [entry] = read_tokens_file(cache.tokens(path))
    assert (entry.trigger, entry.tokens) == ("TOK", ("<s0>", "<s1>"))
    assert torch.equal(entry.clip_l, embeddings["text_encoders_0"]) and torch.equal(entry.clip_g, embeddings[
        "text_encoders_1"])  # fmt: skip
    cache.remove(path)
    assert not list(cache.folder.glob("*.tokens"))


def test_trained_tokens_are_used_for_the_request_and_restored_exactly(fresh_pipeline, tmp_path, lora, caplog):
    pipeline = fresh_pipeline
    cache = LoraCache(tmp_path / "cache")
    originals = (pipeline.sdxl.tokenizer, pipeline.sdxl.text_encoder.get_input_embeddings())
    before = prompt_embeddings(pipeline, "a photo of TOK")
    embeddings = trained_tokens(WIDTHS)
    with caplog.at_level("INFO", logger="models.loras"):
        use(pipeline, write(tmp_path / "training.tar", training_tar(lora, embeddings)), cache)
    assert "trained tokens 'TOK' -> <s0><s1>" in caplog.text
    assert pipeline.tokens.rewrite("a photo of TOK, TOK") == "a photo of <s0><s1>, <s0><s1>"
    for tokenizer, encoder, rows in (
        (pipeline.sdxl.tokenizer, pipeline.sdxl.text_encoder, "text_encoders_0"),
        (pipeline.sdxl.tokenizer_2, pipeline.sdxl.text_encoder_2, "text_encoders_1"),
    ):
        ids = tokenizer("a photo of <s0><s1>", return_tensors="pt").input_ids
        added = ids[ids >= tokenizer.vocab_size]
        assert added.tolist() == [tokenizer.vocab_size, tokenizer.vocab_size + 1]
        table = encoder.get_input_embeddings()
        assert torch.equal(table(added), embeddings[rows])
        known = ids[ids < tokenizer.vocab_size]
        assert torch.equal(table(known), table.table(known))  # the original rows, selected from the original table
    assert not torch.equal(prompt_embeddings(pipeline, "a photo of TOK"), before)

    use(pipeline, None, cache)
    assert (pipeline.sdxl.tokenizer, pipeline.sdxl.text_encoder.get_input_embeddings()) == originals
    assert pipeline.tokens.rewrite("a photo of TOK") == "a photo of TOK"
    assert torch.equal(prompt_embeddings(pipeline, "a photo of TOK"), before)


def test_onetrainer_s_bundled_embeddings_are_tokens_of_their_placeholder(fresh_pipeline, tmp_path, tiny_models):
    pipeline = fresh_pipeline
    tensors, header, _ = lora_file(tiny_models, "kohya", seed=4)
    tensors |= {"bundle_emb.mystyle.clip_l": torch.randn(3, WIDTHS[0]), "bundle_emb.mystyle.clip_g": torch.randn(3,
                WIDTHS[1])}  # fmt: skip
    path = tmp_path / "bundled.safetensors"
    save_file(tensors, path, header)
    [entry] = pipeline.loras.read(path).token_sets
    assert entry.trigger == "mystyle" and len(entry.tokens) == 3
    use(pipeline, path, LoraCache(tmp_path / "cache"))
    assert pipeline.tokens.rewrite("in mystyle") == "in " + "".join(entry.tokens)


@pytest.mark.parametrize(
    ("embeddings", "words", "message"),
    [
        ({"text_encoders_0": torch.zeros(2, 768), "text_encoders_1": torch.zeros(2, 1280)}, None,
         "its trained tokens are 768 wide for text_encoder, whose tokens are 32: they were trained for another base"),
        (trained_tokens(WIDTHS), {"TOK": "<s0><s1><s2>"}, "names tokens its embeddings.pti does not hold"),
        ({"text_encoders_0": torch.zeros(2, 32)}, None, "has no text_encoders_0 and text_encoders_1"),
        ({"text_encoders_0": torch.full((2, 32), float("nan")), "text_encoders_1": torch.zeros(2, 32)}, None,
         "holds NaN or infinite values"),
        (trained_tokens(WIDTHS), {"TOK\n": "<s0><s1>"}, "holds control characters"),
    ],
    ids=["sd15-widths", "words-beyond-tokens", "one-encoder", "nan", "control-characters"],
)  # fmt: skip
def test_tokens_that_do_not_fit_refuse_the_lora_in_one_line(fresh_pipeline, tmp_path, lora, embeddings, words, message):
    pipeline = fresh_pipeline
    archive = write(tmp_path / "training.tar", training_tar(lora, embeddings, words))
    with pytest.raises(InputError, match=f"^lora_weights: .*{message}") as refused:
        use(pipeline, archive, LoraCache(tmp_path / "cache"))
    assert "\n" not in str(refused.value)
    assert pipeline.loras.applied == () and pipeline.tokens.applied == () and not pipeline.loras.originals


def test_an_edit_with_trained_tokens_uses_them_and_the_next_edit_is_exactly_as_before(fresh_pipeline, tmp_path, lora):
    pipeline = fresh_pipeline
    image, change_map = tmp_path / "photo.png", tmp_path / "map.png"
    Image.fromarray(photo(64, 48, seed=3)).save(image)
    Image.fromarray(np.full((48, 64), 255, np.uint8)).save(change_map)
    options = EditOptions.from_values({"prompt": "a photo of TOK", "seed": 5, "steps": 2})
    cache = LoraCache(tmp_path / "cache")

    def edited(archive=None) -> np.ndarray:
        loras = LoraOptions.from_values({"lora_weights": str(archive) if archive else ""})
        return edit_files(pipeline, image, change_map, options, loras=loras, lora_cache=cache,
                          allow_lora_paths=True).images[0]  # fmt: skip

    plain = edited()
    with_tokens = edited(write(tmp_path / "tokens.tar", training_tar(lora, trained_tokens(WIDTHS))))
    lora_alone = edited(write(tmp_path / "alone.tar", training_tar(lora, None)))
    assert not np.array_equal(with_tokens, lora_alone) and not np.array_equal(lora_alone, plain)
    assert np.array_equal(edited(), plain)
