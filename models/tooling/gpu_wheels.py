"""Download, here, the wheels that scripts/gpu-check installs on the lent GPU machine, which has no network.

    python scripts/gpu-wheels [--dest .gpu-wheels]

The machine (nvidia-h200: Python 3.12, x86-64 Linux) has torch 2.11, transformers 5.17, tokenizers 0.23.2,
accelerate 1.15, safetensors 0.8.0, huggingface_hub 1.33 and numpy 2.5.2, and neither diffusers nor pillow-heif. The
folder gets this project's pins (requirements.txt; peft from requirements-dev.txt, for the benchmark's baseline) of
the packages it lacks or has at another version, except those in KEPT, for CPython 3.12 on manylinux x86-64. Other
wheels in the folder are removed (two versions of one package stop pip). Then it checks, offline, that pip installs
the folder as gpu-check does, and that the wheels' own requirements are met by each other or by the versions the
machine is known to have. Prints each file, the total beside the working tree against the 64 MiB the device tool
carries, and the carry list to give it.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DEST = ROOT / ".gpu-wheels"
PIN_FILES = (ROOT / "requirements.txt", ROOT / "requirements-dev.txt")
CARRIED = ("diffusers", "transformers", "tokenizers", "pillow", "pillow-heif", "peft")
KEPT = {
    "torch": "2.11.0+cu130 there; far over the 64 MiB the tool carries",
    "huggingface-hub": "1.33.0 there; 2.4.0 needs httpx2, which the machine lacks, and 1.33 meets diffusers' and "
    "transformers' >=1.32",
    "numpy": "2.5.2 there; 16 MiB, and the machine's compiled packages (torch among them) are built against it",
    "accelerate": "1.15.0 there, as pinned",
    "safetensors": "0.8.0 there, as pinned",
}
MACHINE_VERSIONS = {
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "tokenizers": "0.23.2",
    "accelerate": "1.15.0",
    "safetensors": "0.8.0",
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
}
"""What the machine was seen to have (/work/.library/device/KINDS.md, 2026-11): the wheels' requirements are checked
against these where they are not carried. gpu-check checks them again there, against what is really installed."""
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none"]
TARGET += [f"--platform={tag}" for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64")]
TARGET += ["--platform=manylinux2014_x86_64", "--platform=any", "--only-binary=:all:"]
TOOL_LIMIT_MIB = 64


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions() -> dict[str, str]:
    """name -> version of every `name==version` line of the requirements files, names normalised."""
    pins = {}
    for path in PIN_FILES:
        for line in path.read_text().splitlines():
            name, separator, version = line.split("#")[0].strip().partition("==")
            if separator:
                pins[normalised(name)] = version.strip()
    return pins


def wheel_name_and_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return normalised(name), version


def download(dest: Path, wanted: dict[str, str]) -> None:
    """Fetch each wanted wheel not already in the folder, and remove every other wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    present = {}
    for path in dest.glob("*.whl"):
        if wanted.get(wheel_name_and_version(path)[0]) == wheel_name_and_version(path)[1]:
            present[wheel_name_and_version(path)[0]] = path
        else:
            print(f"removing {path.name}")
            path.unlink()
    missing = [f"{name}=={version}" for name, version in wanted.items() if name not in present]
    if missing:
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check"]
        subprocess.run([*pip, *TARGET, "--dest", str(dest), *missing], check=True)


def installs_offline(dest: Path, wanted: dict[str, str]) -> None:
    """pip's plan for gpu-check's install, from the folder alone: fails here, not on the machine, if one is off."""
    with tempfile.TemporaryDirectory() as target:
        pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-index", "--no-deps"]
        pip += ["--disable-pip-version-check", "--find-links", str(dest), "--target", target, *TARGET]
        subprocess.run([*pip, *(f"{name}=={version}" for name, version in wanted.items())], check=True)


def unmet_requirements(dest: Path) -> tuple[list[str], set[str]]:
    """The wheels' requirements (extras left out) that neither the carried versions nor the machine's known ones
    meet, and the names whose version on the machine is not known here."""
    versions = {**MACHINE_VERSIONS}
    requirements = []
    for path in sorted(dest.glob("*.whl")):
        name, version = wheel_name_and_version(path)
        versions[name] = version
        with zipfile.ZipFile(path) as wheel:
            metadata = next(item for item in wheel.namelist() if item.endswith(".dist-info/METADATA"))
            lines = wheel.read(metadata).decode().splitlines()
        requirements += [(name, line.partition(":")[2].strip()) for line in lines if line.startswith("Requires-Dist:")]
    unmet, unknown = [], set()
    for owner, text in requirements:
        requirement = Requirement(text)
        environment = {"extra": "", "python_version": "3.12", "platform_machine": "x86_64", "sys_platform": "linux"}
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        version = versions.get(normalised(requirement.name))
        if version is None:
            unknown.add(normalised(requirement.name))
        elif not requirement.specifier.contains(version, prereleases=True):
            unmet.append(f"{owner} needs {requirement.name}{requirement.specifier}, would find {version}")
    return unmet, unknown


def travelling_tree_bytes() -> int:
    """Bytes of what the device tool sends besides carried paths: tracked and untracked-not-ignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    paths = [ROOT / os.fsdecode(name) for name in listed if name]
    return sum(path.stat().st_size for path in paths if path.is_file())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpu-wheels", description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEST, help=f"wheel folder (default: {DEST.name})")
    args = parser.parse_args(argv)
    pins = pinned_versions()
    wanted = {name: pins[name] for name in CARRIED}
    download(args.dest, wanted)
    installs_offline(args.dest, wanted)
    unmet, unknown = unmet_requirements(args.dest)
    wheels = sorted(args.dest.glob("*.whl"))
    for path in wheels:
        print(f"{path.stat().st_size / 2**20:6.1f} MiB  {path.name}")
    for name, why in KEPT.items():
        print(f"   not carried  {name}: {why}")
    for line in unmet:
        print(f"   unmet: {line}")
    if unknown:
        print(
            f"   versions on the machine not known here (gpu-check's install checks them): {', '.join(sorted(unknown))}"
        )
    wheel_mib, tree_mib = sum(path.stat().st_size for path in wheels) / 2**20, travelling_tree_bytes() / 2**20
    total = wheel_mib + tree_mib
    print(f"wheels {wheel_mib:.1f} MiB + working tree {tree_mib:.1f} MiB = {total:.1f} of the {TOOL_LIMIT_MIB} MiB")
    print(f'carry: ["{os.path.relpath(args.dest, ROOT)}"]')
    return 1 if unmet or total > TOOL_LIMIT_MIB else 0
