"""Hostile LoRA files: every field of a file is untrusted. Each one is refused in one line naming the input, in bounded
time and memory, before it can hang the worker or poison a picture; a fuzz run over mutated valid files holds the same
promises, and every file that is accepted still keeps black pixels exactly."""

import json
import random
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save

from models.editor import edit_files
from models.errors import InputError
from models.inputs import EditOptions, LoraOptions
from models.loras.cache import LoraCache
from models.loras.files import require_safetensors
from models.loras.formats import Targets, read_lora
from models.loras.header import LoraError
from models.tooling.measuring import PeakMemory
from models.tooling.pictures import photo
from tests.support.hostile import hostile_files, raw_safetensors
from tests.support.loras import lora_file

NAME = "lora_weights"
SECONDS = 2.0
"""Most a hostile file may take to be refused on this project's 2-core machines."""
MEMORY = 256 * 2**20
"""Most the refusal of a hostile file may add to the process's peak memory."""
FUZZ_CASES = 240


@pytest.fixture(scope="module")
def targets(tiny_models) -> Targets:
    return Targets.of(tiny_models)


@pytest.fixture(scope="module")
def hostile(tiny_models) -> dict[str, tuple[bytes, str]]:
    return hostile_files(tiny_models)


def read_as_a_request_does(path: Path, targets: Targets) -> list:
    """What a request does with a fetched file: the checks of the fetch, then reading it; errors named as served."""
    require_safetensors(NAME, path)
    try:
        return read_lora(path, targets).updates
    except LoraError as error:
        raise InputError(f"{NAME}: {error}") from None


def assert_one_clear_line(message: str, *fragments: str) -> None:
    assert message.startswith(f"{NAME}: ") and "\n" not in message and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    "name",
    [
        "redos-alpha-pattern", "pattern-not-a-regex", "nan-tensor", "infinite-alpha-tensor", "empty-alpha-tensor",
        "infinite-alpha-number", "huge-alpha-integer", "huge-header-alpha", "deeply-nested-metadata",
        "metadata-not-an-object", "alpha-pattern-a-list", "alpha-a-string", "rslora-not-a-bool", "huge-offsets",
        "120000-zero-size-tensors", "16-mib-header", "largest-header-allowed",
    ],
)  # fmt: skip
def test_a_hostile_file_is_refused_in_one_line_quickly_and_within_bounded_memory(hostile, targets, tmp_path, name):
    content, expected = hostile[name]
    path = tmp_path / "lora.safetensors"
    path.write_bytes(content)
    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    started = time.perf_counter()
    with pytest.raises(InputError) as refused:
        read_as_a_request_does(path, targets)
    seconds = time.perf_counter() - started
    assert_one_clear_line(str(refused.value), expected)
    assert seconds < SECONDS, f"{name}: {seconds:.2f} s"
    assert memory.peak_bytes() < MEMORY, f"{name}: {memory.peak_bytes() / 2**20:.0f} MiB"


def test_plain_module_names_in_alpha_pattern_are_read_as_peft_reads_them(tiny_models, targets, tmp_path):
    """A key is the module's name, or its last dotted parts, never a regular expression."""
    tensors, header, _ = lora_file(tiny_models, "peft")
    adapter = json.loads(header["lora_adapter_metadata"])
    module = sorted({update.module for update in read_lora_bytes(save(tensors, header), targets, tmp_path)})[0]
    suffix = ".".join(module.split(".")[-2:])
    adapter["unet.alpha_pattern"] = {suffix: 7.0, "not_a_layer": 99.0}
    updates = read_lora_bytes(
        save(tensors, {**header, "lora_adapter_metadata": json.dumps(adapter)}), targets, tmp_path
    )
    alphas = {update.module: update.alpha for update in updates if update.component == "unet"}
    assert alphas[module] == 7.0
    assert all(alpha == adapter["unet.lora_alpha"] for name, alpha in alphas.items() if not name.endswith(suffix))


def read_lora_bytes(content: bytes, targets: Targets, folder: Path) -> list:
    path = folder / "lora.safetensors"
    path.write_bytes(content)
    return read_lora(path, targets).updates


def test_a_file_is_refused_by_its_names_before_any_tensor_is_made(tiny_models, targets, tmp_path, monkeypatch):
    """A key SDXL lacks stops the read before get_tensor runs: no tensor is made for a file that will be refused."""
    tensors, header, _ = lora_file(tiny_models, "kohya")
    tensors["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(4, 4)
    made = []
    from safetensors import safe_open

    real_open = safe_open

    class Counting:
        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc_info):
            return self.file.__exit__(*exc_info)

        def keys(self):
            return self.file.keys()

        def metadata(self):
            return self.file.metadata()

        def get_tensor(self, key):
            made.append(key)
            return self.file.get_tensor(key)

    monkeypatch.setattr("models.loras.formats.safe_open", Counting)
    with pytest.raises(LoraError, match="tensors fit no SDXL layer"):
        read_lora_bytes(save(tensors, header), targets, tmp_path)
    assert made == []


def mutate(content: bytes, rng: random.Random) -> bytes:
    """One random mutation of a valid file: a bit flip or truncation anywhere, or a change of one field of its JSON
    header (a type swap, a huge or non-finite number, deep nesting, a huge count of entries)."""
    (header_size,) = struct.unpack("<Q", content[:8])
    header, body = json.loads(content[8 : 8 + header_size]), content[8 + header_size :]
    kind = rng.choice(["flip", "truncate", "swap", "number", "nest", "count", "metadata"])
    if kind == "flip":
        position = rng.randrange(len(content) if rng.random() < 0.3 else 8 + header_size)
        return content[:position] + bytes([content[position] ^ (1 << rng.randrange(8))]) + content[position + 1 :]
    if kind == "truncate":
        return content[: rng.randrange(len(content))]
    keys = [key for key in header if key != "__metadata__"]
    key = rng.choice(keys)
    replacements = [None, "text", [], {}, True, -1, 2**70, 1e308, float("inf"), float("nan"), [[[[[0]]]]]]
    if kind == "swap":
        field = rng.choice(["dtype", "shape", "data_offsets"])
        header[key][field] = rng.choice(replacements)
    elif kind == "number":
        header[key]["shape"] = [rng.choice([0, -1, 2**40, 10**30])] * len(header[key]["shape"])
    elif kind == "nest":
        header["__metadata__"] = {"lora_adapter_metadata": "[" * 50_000 + "]" * 50_000}
    elif kind == "count":
        for index in range(rng.choice([1000, 40_000])):
            header[f"extra{index}"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    else:
        metadata = dict(header.get("__metadata__", {}))
        metadata[rng.choice(["lora_adapter_metadata", "alpha", "ss_network_alpha", "__eridiffusion_ckpt__"])] = (
            rng.choice(['{"unet.lora_alpha": 1e999}', '{"unet.alpha_pattern": {"(x+)+y": 1}}', "NaN", "[]", '"x"'])
        )
        header["__metadata__"] = metadata
    return raw_safetensors(header, body)


@pytest.fixture(scope="module")
def edit_inputs(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("fuzz-edit")
    change_map = np.zeros((48, 64), np.uint8)
    change_map[:, 40:] = 255
    Image.fromarray(photo(64, 48, seed=8)).save(folder / "photo.png")
    Image.fromarray(change_map).save(folder / "map.png")
    return folder / "photo.png", folder / "map.png"


def test_mutated_files_are_refused_in_one_line_or_edit_with_black_kept_exactly(
    tiny_models, targets, pipeline, edit_inputs, tmp_path
):
    """A bounded fuzz run, seeded: every mutation of valid files of three layouts either reads or is refused in one
    line, each within the time and memory bounds; a sample of the accepted ones edits with black kept exactly."""
    rng = random.Random(22)
    valid = [save(tensors, header) for tensors, header, _ in (lora_file(tiny_models, layout) for layout in (
        "kohya", "peft", "eridiffusion-v2-full"))]  # fmt: skip
    image_path, map_path = edit_inputs
    image = np.asarray(Image.open(image_path).convert("RGB"))
    edit_files(pipeline, image_path, map_path, EditOptions.from_values({"steps": 1}))  # first-run costs paid here
    memory = PeakMemory(torch.device("cpu"))
    accepted, refused, edited = 0, 0, 0
    for case in range(FUZZ_CASES):
        path = tmp_path / f"case-{case}.safetensors"
        path.write_bytes(mutate(rng.choice(valid), rng))
        memory.reset(collect=False)
        started = time.perf_counter()
        try:
            read_as_a_request_does(path, targets)
            read = True
        except InputError as error:
            assert_one_clear_line(str(error))
            read = False
        # The bound is on reading (or refusing) the file; the sample edits below are not part of it.
        assert time.perf_counter() - started < 3 * SECONDS, f"case {case}"
        refused += not read
        accepted += read
        if read and edited < 6:  # the whole request on an accepted file: black stays exact, or one line
            edited += 1
            loras = LoraOptions.from_values({"lora_weights": str(path)})
            options = EditOptions.from_values({"seed": case, "steps": 1})
            try:
                result = edit_files(pipeline, image_path, map_path, options, loras=loras,
                                    lora_cache=LoraCache(tmp_path / "cache"), allow_lora_paths=True)  # fmt: skip
            except InputError as error:
                assert_one_clear_line(str(error))
            else:
                assert np.array_equal(result.images[0][:, :24], image[:, :24])
        assert memory.peak_bytes() < MEMORY, f"case {case}: {memory.peak_bytes() / 2**20:.0f} MiB"
    pipeline.loras.restore()
    assert refused > FUZZ_CASES // 2 and accepted > 0 and edited > 0
