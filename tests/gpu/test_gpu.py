"""The GPU path on a real CUDA device: what the CPU tests can only imitate.

bf16 end to end without NaNs, the VAE never upcast to float32, black kept byte for byte in bf16, no host syncs inside
the denoising loop (checked by torch.cuda.set_sync_debug_mode, not by patching tensor methods), and recovery from a
real CUDA out-of-memory error. Marked `cuda` and skipped without a CUDA device. scripts/gpu-check runs them on
full-size random weights ($GPU_CHECK_WEIGHTS) and collects the figures they record ($GPU_CHECK_RECORD); without it
they use the tiny weights.
"""

import gc
import io
import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import pipeline as pipeline_module
from models.editor import edit_files
from models.errors import NotEnoughMemoryError
from models.inputs import EditOptions
from models.maps import shaping
from models.pictures.write import encode_image
from models.sizing import working_size
from models.tooling.pictures import photo
from models.tooling.random_weights.build import write_test_weights
from models.weights.load import load_pipeline, select_device
from tests.support.editing import changed_amount, edit, half_map

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

WEIGHTS_SWITCH = "GPU_CHECK_WEIGHTS"
"""A weights folder to test on (scripts/gpu-check gives its full-size random weights); the tiny ones without it."""
RECORD_SWITCH = "GPU_CHECK_RECORD"
"""A JSON-lines file the tests append their figures to, for scripts/gpu-check's report."""
SIDE = 1024
"""Input side of most edits: the serving working size, so that nothing is resized on the way in."""
MEMORY_SLACK = 64 * 2**20
"""What the allocator may still hold after a failed prediction has been cleaned up: rounding, not tensors."""


@pytest.fixture(scope="module")
def weights(request) -> Path:
    given = os.environ.get(WEIGHTS_SWITCH)
    return Path(given) if given else request.getfixturevalue("tiny_weights")


@pytest.fixture(scope="module")
def gpu_pipeline(weights):
    """Loaded as setup() loads it: the device and dtype serving picks, the fast path applied, no compile."""
    device, dtype = select_device()
    return load_pipeline(weights, device, dtype)


@pytest.fixture
def record(request) -> Callable[..., None]:
    """Append this test's figures to $GPU_CHECK_RECORD; nothing happens without it."""
    path = os.environ.get(RECORD_SWITCH)

    def write(**figures) -> None:
        if path:
            with open(path, "a", encoding="utf-8") as file:
                file.write(json.dumps({"test": request.node.name, **figures}) + "\n")

    return write


def first_tensor(output) -> torch.Tensor:
    """A module's main output: itself, or the first field of a tuple or a transformers/diffusers output."""
    return output if isinstance(output, torch.Tensor) else output[0]


@contextmanager
def finite_outputs(modules: dict[str, torch.nn.Module]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Whether each call's output was all finite, kept on the device (read after the edit, so nothing waits)."""
    finite: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    hooks = [
        module.register_forward_hook(
            lambda module, args, output, name=name: finite[name].append(torch.isfinite(first_tensor(output)).all())
        )
        for name, module in modules.items()
    ]
    try:
        yield finite
    finally:
        for hook in hooks:
            hook.remove()


def test_serving_loads_every_model_on_the_gpu_in_bf16(gpu_pipeline):
    assert (gpu_pipeline.device.type, gpu_pipeline.dtype) == ("cuda", torch.bfloat16)
    models = {
        "unet": gpu_pipeline.unet,
        "vae": gpu_pipeline.vae,
        "text_encoder": gpu_pipeline.sdxl.text_encoder,
        "text_encoder_2": gpu_pipeline.sdxl.text_encoder_2,
    }
    if getattr(gpu_pipeline, "safety", None) is not None:  # the safety checker, where this tree has it
        models["safety_checker"] = gpu_pipeline.safety.model
    for name, model in models.items():
        tensors = [*model.parameters(), *(buffer for buffer in model.buffers() if buffer.is_floating_point())]
        assert {(tensor.device.type, tensor.dtype) for tensor in tensors} == {("cuda", torch.bfloat16)}, name


def test_bf16_edit_has_no_nans_from_the_text_encoders_to_the_vae_decoder(gpu_pipeline):
    models = {
        "text_encoder": gpu_pipeline.sdxl.text_encoder,
        "text_encoder_2": gpu_pipeline.sdxl.text_encoder_2,
        "vae_encoder": gpu_pipeline.vae.encoder,
        "unet": gpu_pipeline.unet,
        "vae_decoder": gpu_pipeline.vae.decoder,
    }
    image = photo(SIDE, SIDE, seed=1)
    with finite_outputs(models) as finite:
        outputs = edit(gpu_pipeline, image, half_map(SIDE, SIDE), seed=1, num_outputs=2)
    calls = {name: len(flags) for name, flags in finite.items()}
    assert calls == {"text_encoder": 1, "text_encoder_2": 1, "vae_encoder": 1, "unet": 4, "vae_decoder": 1}
    assert {name: all(bool(flag) for flag in flags) for name, flags in finite.items()} == dict.fromkeys(models, True)
    assert not np.array_equal(outputs[0], outputs[1])
    assert all(changed_amount(output[:, SIDE // 2 + 64 :], image[:, SIDE // 2 + 64 :]) > 10 for output in outputs)


def test_vae_never_upcasts_to_float32(gpu_pipeline, record):
    """Every module of the VAE, not only its entry points, sees bf16 inputs only, while encoding and decoding."""
    seen: dict[str, set[torch.dtype]] = defaultdict(set)

    def note(module, args, name):
        seen[name] |= {value.dtype for value in args if isinstance(value, torch.Tensor) and value.is_floating_point()}

    hooks = [
        module.register_forward_pre_hook(lambda module, args, name=name: note(module, args, name))
        for name, module in gpu_pipeline.vae.named_modules()
        if name
    ]
    try:
        edit(gpu_pipeline, photo(SIDE, SIDE, seed=2), half_map(SIDE, SIDE), seed=2)
    finally:
        for hook in hooks:
            hook.remove()
    called = {name: dtypes for name, dtypes in seen.items() if dtypes}
    assert "encoder" in called and "decoder" in called
    assert {name: dtypes for name, dtypes in called.items() if dtypes != {torch.bfloat16}} == {}
    record(vae_modules_seen=len(called), input_dtypes=sorted(str(dtype) for dtype in set().union(*called.values())))


def test_black_keeps_exactly_in_bf16_byte_for_byte_in_png(gpu_pipeline):
    """An input off the working size, so that the result is resized back before the composite."""
    width, height = 1280, 960
    image = photo(width, height, seed=3)
    outputs = edit(gpu_pipeline, image, half_map(height, width), seed=3, num_outputs=2)
    scale = width / working_size(width, height)[0]
    keep_until = width // 2 - int(np.ceil(2 * shaping.FEATHER_PX * scale)) - 2
    for output in outputs:
        decoded = np.asarray(Image.open(io.BytesIO(encode_image(output, "png", 90))))
        assert np.array_equal(decoded[:, :keep_until], image[:, :keep_until])
        assert changed_amount(decoded[:, width // 2 + 64 :], image[:, width // 2 + 64 :]) > 10


@contextmanager
def sync_debug_mode(mode: str) -> Iterator[None]:
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_denoising_loop_makes_no_host_syncs(gpu_pipeline, monkeypatch, record):
    """The loop runs with synchronising CUDA calls turned into errors; the stages around it may synchronise."""
    with sync_debug_mode("error"), pytest.raises(RuntimeError, match="synchroniz"):
        torch.ones(1, device="cuda").item()  # the mode catches a sync: the check below can fail
    sample, unet_calls = pipeline_module.sampler.sample, []

    def strict_sample(*args, **kwargs):
        with sync_debug_mode("error"):
            return sample(*args, **kwargs)

    monkeypatch.setattr(pipeline_module.sampler, "sample", strict_sample)
    hook = gpu_pipeline.unet.register_forward_pre_hook(lambda module, args: unet_calls.append(len(args[0])))
    try:
        edit(gpu_pipeline, photo(SIDE, SIDE, seed=4), half_map(SIDE, SIDE), seed=4, num_outputs=2)
    finally:
        hook.remove()
    assert unet_calls == [2, 2, 2, 2]
    record(unet_calls_in_strict_loop=len(unet_calls))


def test_make_test_weights_on_the_gpu_writes_the_cpu_bytes(tmp_path):
    """--device cuda only moves where the weights are filled: every file hashes the same as the CPU's."""
    manifests = {}
    for device in ("cpu", "cuda"):
        write_test_weights(tmp_path / device, "tiny", 3, torch.device(device))
        manifests[device] = json.loads((tmp_path / device / "manifest.json").read_text())["files"]
    assert manifests["cuda"] == manifests["cpu"]


def write_inputs(folder: Path, side: int) -> tuple[Path, Path]:
    image_path, map_path = folder / "image.png", folder / "map.png"
    Image.fromarray(photo(side, side, seed=5)).save(image_path)
    Image.fromarray((half_map(side, side) * 255).astype(np.uint8)).save(map_path)
    return image_path, map_path


def free_cached_memory() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def test_real_out_of_memory_is_one_line_frees_memory_and_fewer_outputs_then_fit(gpu_pipeline, tmp_path, record):
    """The memory cap allows one output's peak twice over; four outputs need more, so the allocator itself fails.

    Through edit_files, the call predict.py makes. The same cap then fits one output: the error's advice works.
    """
    image_path, map_path = write_inputs(tmp_path, SIDE)

    def predict(num_outputs: int):
        options = EditOptions.from_values({"prompt": "a red boat", "num_outputs": num_outputs, "seed": 7})
        return edit_files(gpu_pipeline, image_path, map_path, options)

    predict(1)  # cuBLAS workspaces and cuDNN plans are made once, before anything is measured
    free_cached_memory()
    resting = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    predict(1)
    one_output = torch.cuda.max_memory_reserved() - resting
    free_cached_memory()
    allocated_before, reserved_before = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    cap = reserved_before + 2 * one_output
    total = torch.cuda.get_device_properties(0).total_memory
    ooms_before = torch.cuda.memory_stats()["num_ooms"]
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        with pytest.raises(NotEnoughMemoryError) as raised:
            predict(4)
        torch.cuda.synchronize()
        ooms = torch.cuda.memory_stats()["num_ooms"] - ooms_before
        allocated_after, reserved_after = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        after = predict(1)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    record(
        one_output_peak_mib=one_output / 2**20,
        cap_mib=cap / 2**20,
        allocated_mib={"before": allocated_before / 2**20, "after": allocated_after / 2**20},
        reserved_mib={"before": reserved_before / 2**20, "after": reserved_after / 2**20},
        allocator_ooms=ooms,
    )
    assert str(raised.value) == (
        f"num_outputs: out of memory making 4 output(s) of a {SIDE}x{SIDE} image;"
        " lower num_outputs or send a smaller image"
    )
    assert ooms >= 1, "the allocator never ran out: the failure came from elsewhere"
    assert allocated_after <= allocated_before + MEMORY_SLACK, "the failed prediction's tensors were not freed"
    assert reserved_after <= reserved_before + MEMORY_SLACK, "the CUDA cache was not emptied"
    [output] = after.images
    assert output.shape == (SIDE, SIDE, 3)
