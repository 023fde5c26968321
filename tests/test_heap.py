"""The heap policy setup applies (models/resources.py): which settings reach glibc, and how one is chosen."""

import subprocess
import sys
from pathlib import Path

import pytest

from models import resources

ROOT = Path(__file__).resolve().parent.parent


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
    monkeypatch.setattr(resources, "_glibc", lambda: fake)
    monkeypatch.setattr(resources, "_edit_policy", resources._edit_policy)  # set back after the test
    monkeypatch.delenv("HEAP_POLICY", raising=False)
    return fake


def test_the_default_policy_applies_its_settings(glibc):
    assert resources.configure_heap() == resources.DEFAULT_HEAP_POLICY
    assert glibc.calls == list(resources.HEAP_POLICIES[resources.DEFAULT_HEAP_POLICY].settings.values())


def test_heap_policy_from_the_environment(glibc, monkeypatch):
    monkeypatch.setenv("HEAP_POLICY", "mmap-1mib")
    assert resources.configure_heap() == "mmap-1mib"
    assert glibc.calls == [(-3, 1 << 20)]
    monkeypatch.setenv("HEAP_POLICY", "glibc")
    glibc.calls.clear()
    assert resources.configure_heap() == "glibc" and glibc.calls == []


def test_an_unknown_policy_is_one_line_naming_the_choices(glibc, monkeypatch):
    monkeypatch.setenv("HEAP_POLICY", "jemalloc")
    choices = "edit-in-heap, mmap-32mib, no-mmap, mmap-1mib, glibc"
    with pytest.raises(ValueError, match=rf"^HEAP_POLICY: 'jemalloc' is not one of {choices}$"):
        resources.configure_heap()
    assert glibc.calls == []


def test_a_refused_setting_is_logged_and_the_rest_applied(monkeypatch, caplog):
    parameters = [parameter for parameter, _ in resources.HEAP_POLICIES["no-mmap"].settings.values()]
    fake = FakeGlibc(refused=frozenset(parameters[:1]))
    monkeypatch.setattr(resources, "_glibc", lambda: fake)
    resources.configure_heap("no-mmap")
    assert [parameter for parameter, _ in fake.calls] == parameters
    assert "heap: glibc refused M_MMAP_MAX=0" in caplog.text


def test_other_c_libraries_get_nothing(monkeypatch):
    monkeypatch.setattr(resources, "_glibc", lambda: None)
    assert resources.configure_heap("no-mmap") == "no-mmap"


def test_the_real_glibc_accepts_every_setting():
    """mallopt() on this machine's glibc knows every policy's parameter numbers (in a child: the settings stay)."""
    if resources._glibc() is None:
        pytest.skip("not glibc")
    script = """from models import resources
for policy in resources.HEAP_POLICIES:
    resources.configure_heap(policy)
    with resources.heap_for_edit():
        pass"""
    child = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "refused" not in child.stdout + child.stderr


def test_an_edit_runs_under_the_policys_edit_settings_and_sets_them_back_however_it_ends(glibc):
    """Every block from the heap and no trimming on free() during the edit; after it, the values setup gave them."""
    resources.configure_heap("edit-in-heap")
    assert [call for call in glibc.calls if call[0] in (-4, -1)] == [(-4, 65536), (-1, 128 << 10)]
    glibc.calls.clear()
    during, after = [(-4, 0), (-1, 1 << 30)], [(-4, 65536), (-1, 128 << 10)]
    with resources.heap_for_edit():
        assert glibc.calls == during
    assert glibc.calls == during + after
    glibc.calls.clear()
    with pytest.raises(KeyboardInterrupt), resources.heap_for_edit():
        raise KeyboardInterrupt
    assert glibc.calls == during + after


def test_a_policy_without_edit_settings_changes_nothing_for_an_edit(glibc):
    resources.configure_heap("mmap-32mib")
    glibc.calls.clear()
    with resources.heap_for_edit():
        pass
    assert glibc.calls == []
