"""models/settings.py: every environment variable through one parser per kind, read when asked for, a bad value
refused in one line naming the variable."""

import pytest

from models import settings
from models.errors import SettingError


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("TRUE", True), (" on ", True), ("yes", True),
                                                 ("", False), ("0", False), ("off", False), ("No", False)])  # fmt: skip
def test_switches_read_the_usual_words(monkeypatch, value, expected):
    monkeypatch.setenv("COMPILE", value)
    assert settings.enabled(settings.COMPILE) is expected


def test_a_switch_with_another_word_is_one_line_naming_it(monkeypatch):
    monkeypatch.setenv("LOW_VRAM", "maybe")
    with pytest.raises(
        SettingError, match=r"^LOW_VRAM: must be 1 or 0 \(or true/false, yes/no, on/off\), got 'maybe'$"
    ):
        settings.enabled(settings.LOW_VRAM)


def test_unset_settings_take_their_defaults(monkeypatch):
    for setting in settings.SETTINGS:
        monkeypatch.delenv(setting.name, raising=False)
    assert str(settings.model_cache()) == "model-cache"
    assert settings.hf_endpoint() == "https://huggingface.co"
    assert settings.folder(settings.LORA_CACHE) is None
    assert settings.byte_count(settings.LORA_CACHE_MAX) == 20 * 2**30
    assert settings.seconds(settings.LORA_DOWNLOAD_TIMEOUT) == 900
    assert not settings.enabled(settings.ALLOW_PRIVATE_LORA_HOSTS)


@pytest.mark.parametrize(("setting", "value", "message"), [
    (settings.LORA_CACHE_MAX, "20G", "must be a whole number of bytes, got '20G'"),
    (settings.LORA_DOWNLOAD_TIMEOUT, "-5", "must be a positive number of seconds, got '-5'"),
    (settings.LORA_DOWNLOAD_TIMEOUT, "inf", "must be a positive number of seconds, got 'inf'"),
])  # fmt: skip
def test_numbers_are_checked(monkeypatch, setting, value, message):
    monkeypatch.setenv(setting.name, value)
    parse = settings.byte_count if setting is settings.LORA_CACHE_MAX else settings.seconds
    with pytest.raises(SettingError, match=f"^{setting.name}: {message}$"):
        parse(setting)


def test_every_setting_is_named_once():
    names = [setting.name for setting in settings.SETTINGS]
    assert len(names) == len(set(names)) and all(setting.meaning for setting in settings.SETTINGS)
