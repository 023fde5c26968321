"""predict.py as `cog build` sees it: the current Cog API, and the inputs the README documents."""

import warnings

from cog import _inspector


def test_predictor_schema_uses_the_current_api_and_documents_every_input():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        info = _inspector.create_predictor("predict", "Predictor")
    inputs = info.inputs
    assert list(inputs) == [
        "prompt", "image", "map", "steps", "strength", "invert_map", "seed",
        "num_outputs", "negative_prompt", "guidance_scale", "output_format", "output_quality",
    ]  # fmt: skip
    defaults = {name: field.default for name, field in inputs.items()}
    assert defaults | {"prompt": None} == {
        "prompt": None, "image": None, "map": None, "steps": 4, "strength": 1.0, "invert_map": False,
        "seed": None, "num_outputs": 1, "negative_prompt": "", "guidance_scale": 0.0,
        "output_format": "webp", "output_quality": 90,
    }  # fmt: skip
    assert (inputs["steps"].ge, inputs["steps"].le) == (1, 16)
    assert (inputs["num_outputs"].ge, inputs["num_outputs"].le) == (1, 4)
    assert (inputs["strength"].ge, inputs["strength"].le) == (0, 1)
    assert inputs["output_format"].choices == ["webp", "png", "jpg"]
    assert all(field.description for field in inputs.values())
