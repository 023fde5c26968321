"""Results written as they come, and the commit they were measured at; no torch here, so that a child process whose
torch does not import can still report it."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def git_commit() -> str:
    """The checkout's short commit, or "unknown" where there is no git (the device tool's copy has none)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_atomically(path: Path, text: str) -> None:
    """Replace a file in one step, so a reader (or a run stopped part way) never sees half of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
