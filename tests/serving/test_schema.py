"""predict.py and train.py as `cog build` reads them: statically, by the rules of Cog's own parser, and in agreement
with the limits the package enforces at run time."""

import ast
import contextlib
import io
import tokenize
import warnings
from pathlib import Path
from typing import Any

import pytest
from cog import _inspector

from models.inputs import INPUTS, REQUIRED
from models.training.inputs import TRAINING_INPUTS

PREDICT = Path(__file__).resolve().parents[2] / "predict.py"
TRAIN = PREDICT.with_name("train.py")
LITERAL_KEYWORDS = ("default", "ge", "le", "min_length", "max_length", "regex", "description", "choices")
ENTRY_POINTS = {  # file, the function Cog reads (a method of the class, or a function), the table it must state
    "predict": (PREDICT, "run", INPUTS),
    "train": (TRAIN, "train", TRAINING_INPUTS),
}


class Unresolvable(Exception):
    """A value Cog's static parser would drop (or, for choices, fail the build on)."""


def literal(node: ast.expr) -> Any:
    """What Cog's parser accepts as a literal: constants, negative numbers, and lists of literals."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        return -node.operand.value
    if isinstance(node, ast.List | ast.Tuple):
        return [literal(element) for element in node.elts]
    raise Unresolvable(ast.dump(node))


def top_level_literals(tree: ast.Module) -> dict[str, Any]:
    """Names bound to a literal at predict.py's top level: the only names Cog resolves (imports never are)."""
    names = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target, value = statement.targets[0], statement.value
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            target, value = statement.target, statement.value
        else:
            continue
        if isinstance(target, ast.Name):
            with contextlib.suppress(Unresolvable):
                names[target.id] = literal(value)
    return names


def one_string_token(source: str, node: ast.expr) -> bool:
    """Whether a string is written as ONE plain literal: Cog keeps inner quotes of adjacent literals, drops
    parenthesised ones, fails on f-strings and does not process escapes."""
    segment = ast.get_source_segment(source, node)
    tokens = tokenize.generate_tokens(io.StringIO(segment).readline)
    tokens = [token for token in tokens if token.type == tokenize.STRING]
    return len(tokens) == 1 and tokens[0].string == segment and segment[0] in "\"'" and "\\" not in segment


def static_inputs(path: Path = PREDICT, function: str = "run") -> dict[str, dict[str, Any]]:
    """Each input's Input() keywords as Cog's static parser resolves them; fails on anything it would not."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    constants = top_level_literals(tree)
    [target] = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == function]
    arguments = [argument for argument in target.args.args if argument.arg != "self"]
    defaults = dict(zip([argument.arg for argument in arguments], target.args.defaults, strict=True))
    found = {}
    for argument in arguments:
        call = defaults[argument.arg]
        assert isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "Input", argument.arg
        assert not call.args, f"{argument.arg}: Cog reads keyword arguments only"
        values = {}
        for keyword in call.keywords:
            assert keyword.arg in LITERAL_KEYWORDS, f"{argument.arg}: unknown Input() keyword {keyword.arg}"
            node = keyword.value
            if isinstance(node, ast.Name):
                assert node.id in constants, f"{argument.arg}.{keyword.arg}: {node.id} is not a top-level literal"
                values[keyword.arg] = constants[node.id]
                continue
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert one_string_token(source, node), f"{argument.arg}.{keyword.arg}: not one plain literal"
            try:
                values[keyword.arg] = literal(node)
            except Unresolvable:
                raise AssertionError(f"{argument.arg}.{keyword.arg}: Cog cannot resolve it statically") from None
        found[argument.arg] = values
    return found


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_input_is_statically_readable_and_described(entry):
    path, function, table = ENTRY_POINTS[entry]
    found = static_inputs(path, function)
    assert list(found) == list(table)
    for name, values in found.items():
        assert isinstance(values.get("description"), str) and values["description"].strip(), name


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_each_entry_point_states_the_limits_the_package_enforces(entry):
    """Every Input() of predict.py and train.py says what its table of inputs says: description, default, bounds,
    choices."""
    path, function, table = ENTRY_POINTS[entry]
    found = static_inputs(path, function)
    for name, spec in table.items():
        expected = {
            "description": spec.description,
            "default": None if spec.default is REQUIRED else spec.default,
            "ge": spec.low,
            "le": spec.high,
            "choices": list(spec.choices) or None,
            "max_length": spec.max_length,
        }
        stated = {keyword: found[name].get(keyword) for keyword in expected}
        assert stated == expected, name


@pytest.mark.parametrize(
    ("good", "bad"),
    [
        ("le=MAX_STEPS", "le=limits.MAX_STEPS"),  # an imported name: Cog drops the bound without a word
        ("choices=OUTPUT_FORMATS", "choices=list(OUTPUT_FORMATS)"),  # a hard build error
        ('description="Denoising steps."', 'description="Denoising " "steps."'),  # comes out with quotes inside
        ('description="Denoising steps."', 'description=f"Denoising {MAX_STEPS} steps."'),
    ],
)
def test_the_static_reader_catches_what_cog_would_drop(tmp_path, good, bad):
    source = PREDICT.read_text(encoding="utf-8")
    assert good in source
    broken = tmp_path / "predict.py"
    broken.write_text(source.replace(good, bad, 1), encoding="utf-8")
    with pytest.raises(AssertionError):
        static_inputs(broken)


@pytest.mark.parametrize(("entry", "name"), [("predict", "Predictor"), ("train", "train")])
def test_the_python_sdk_reads_the_same_schema_with_the_current_api(entry, name):
    path, function, table = ENTRY_POINTS[entry]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        info = _inspector.create_predictor(entry, name)
    assert list(info.inputs) == list(table)
    static = static_inputs(path, function)
    for name, field in info.inputs.items():
        assert field.description == static[name]["description"], name
        if "default" in static[name]:
            assert field.default == static[name]["default"], name
