"""The heap policy setup applies (models/heap.py): which settings reach glibc, and how one is chosen."""

import subprocess
import sys
from pathlib import Path

import pytest

from models import heap

ROOT = Path(__file__).resolve().parents[2]


class FakeGlibc:
    """Records mallopt() calls; refuses the parameters named in `refused`, as glibc returns 0 for those."""

    def __init__(self, refused: frozenset[int] = frozenset()):
        self.calls: list[tuple[int, int]] = []
        self.refused = refused

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return 0 if parameter in self.refused else 1


@pytest.fixture
def glibc(monkeypatch) -> FakeGlibc:
    fake = FakeGlibc()
    monkeypatch.setattr(heap, "_glibc", lambda: fake)
    monkeypatch.setattr(heap, "_configured", heap._configured)  # set back after the test
    monkeypatch.delenv("HEAP_POLICY", raising=False)
    return fake


def test_the_default_policy_applies_its_settings(glibc):
    assert heap.configure() == heap.DEFAULT_POLICY
    assert glibc.calls == list(heap.POLICIES[heap.DEFAULT_POLICY].settings.values())


def test_heap_policy_from_the_environment(glibc, monkeypatch):
    monkeypatch.setenv("HEAP_POLICY", "mmap-1mib")
    assert heap.configure() == "mmap-1mib"
    assert glibc.calls == [(-3, 1 << 20)]
    monkeypatch.setenv("HEAP_POLICY", "glibc")
    glibc.calls.clear()
    assert heap.configure() == "glibc" and glibc.calls == []


def test_an_unknown_policy_is_one_line_naming_the_choices(glibc, monkeypatch):
    monkeypatch.setenv("HEAP_POLICY", "jemalloc")
    choices = "edit-in-heap, mmap-32mib, no-mmap, mmap-1mib, glibc"
    with pytest.raises(ValueError, match=rf"^HEAP_POLICY: 'jemalloc' is not one of {choices}$"):
        heap.configure()
    assert glibc.calls == []


def test_a_refused_setting_is_logged_and_the_rest_applied(monkeypatch, caplog):
    parameters = [parameter for parameter, _ in heap.POLICIES["no-mmap"].settings.values()]
    fake = FakeGlibc(refused=frozenset(parameters[:1]))
    monkeypatch.setattr(heap, "_glibc", lambda: fake)
    heap.configure("no-mmap")
    assert [parameter for parameter, _ in fake.calls] == parameters
    assert "heap: glibc refused M_MMAP_MAX=0" in caplog.text


def test_other_c_libraries_get_nothing(monkeypatch):
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    assert heap.configure("no-mmap") == "no-mmap"


@pytest.mark.slow
def test_the_real_glibc_accepts_every_setting():
    """mallopt() on this machine's glibc knows every policy's parameter numbers (in a child: the settings stay)."""
    if heap._glibc() is None:
        pytest.skip("not glibc")
    script = """from models import heap
for policy in heap.POLICIES:
    heap.configure(policy)
    with heap.for_edit():
        pass"""
    child = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "refused" not in child.stdout + child.stderr


def test_an_edit_runs_under_the_policys_edit_settings_and_sets_them_back_however_it_ends(glibc):
    """Every block from the heap and no trimming on free() during the edit; after it, the values setup gave them."""
    heap.configure("edit-in-heap")
    assert [call for call in glibc.calls if call[0] in (-4, -1)] == [(-4, 65536), (-1, 128 << 10)]
    glibc.calls.clear()
    during, after = [(-4, 0), (-1, 1 << 30)], [(-4, 65536), (-1, 128 << 10)]
    with heap.for_edit():
        assert glibc.calls == during
    assert glibc.calls == during + after
    glibc.calls.clear()
    with pytest.raises(KeyboardInterrupt), heap.for_edit():
        raise KeyboardInterrupt
    assert glibc.calls == during + after


def test_a_policy_without_edit_settings_changes_nothing_for_an_edit(glibc):
    heap.configure("mmap-32mib")
    glibc.calls.clear()
    with heap.for_edit():
        pass
    assert glibc.calls == []
