"""The README's settings table is generated from the settings dataclass and kept in sync."""

from __future__ import annotations

from pathlib import Path

from tools.config_files import END, START, rendered, settings_table, stale

from vlm_worker.config.settings import setting_names

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_settings_table_is_current():
    files = rendered()
    assert stale({README: files[README]}) == []
    assert f"{START}\n{settings_table()}\n{END}" in files[README]


def test_every_setting_is_documented():
    table = settings_table()
    for name in setting_names():
        assert f"`{name}`" in table


def test_readme_commands_exist():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    makefile = (README.parent / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile
    assert "make test" in (README.parent / ".ci" / "run").read_text()
