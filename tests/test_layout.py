"""The layout docs/ARCHITECTURE.md describes: serving code never loads the tooling, nothing imports the tests, the
commands are shims, and modules stay small enough to read."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
TOOLING = MODELS / "tooling"
MAX_MODULE_LINES = 420
"""About 400 lines: past it a module is doing more than one job."""
MAX_SCRIPT_LINES = 20


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, relative imports resolved against its package."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *([node.module] if node.module else [])])
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return found


def python_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*.py") if "__pycache__" not in path.parts)


def test_serving_code_never_imports_the_tooling_or_the_tests():
    entry_points = [ROOT / "predict.py", ROOT / "train.py"]
    serving = [path for path in python_files(MODELS) if TOOLING not in path.parents] + entry_points
    offenders = {
        path.relative_to(ROOT).as_posix(): sorted(name for name in imported_modules(path) if name.startswith(prefix))
        for path in serving
        for prefix in ("models.tooling", "tests")
        if any(name.startswith(prefix) for name in imported_modules(path))
    }
    assert offenders == {}


def test_nothing_outside_the_tests_imports_them():
    code = [*python_files(MODELS), ROOT / "predict.py", ROOT / "train.py", *(ROOT / "scripts").iterdir()]
    offenders = [
        path.relative_to(ROOT).as_posix()
        for path in code
        if path.name != "test" and any(name.split(".")[0] == "tests" for name in imported_modules(path))
    ]
    assert offenders == []


@pytest.mark.slow
@pytest.mark.parametrize(("entry", "core"), [("predict", "models.service"), ("train", "models.training.run")])
def test_loading_an_entry_point_loads_no_tooling(entry, core):
    probe = f"import sys, {entry}; print('\\n'.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    modules = loaded.stdout.split()
    assert core in modules
    assert [name for name in modules if name.startswith(("models.tooling", "tests"))] == []


def test_every_script_is_a_shim_over_one_main():
    for script in sorted((ROOT / "scripts").iterdir()):
        lines = script.read_text(encoding="utf-8").splitlines()
        assert len(lines) <= MAX_SCRIPT_LINES, script.name
        if script.name != "test":  # the README's test command, in bash
            assert any(line.startswith("from models.") and line.endswith(" import main") for line in lines), script.name


def test_modules_stay_readable():
    long = {
        path.relative_to(ROOT).as_posix(): count
        for path in python_files(MODELS)
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}
