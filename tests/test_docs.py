"""docs/flags.md stays true: its flag tables are the ones the absl definitions generate."""

from __future__ import annotations

from tools import flag_table


def test_flag_page_tables_match_the_flag_definitions():
    current = flag_table.PAGE.read_text(encoding="utf-8")
    for name in flag_table.TABLES:
        start, end = flag_table.markers(name)
        assert start in current and end in current
    assert flag_table.render(current) == current, "run: python -m tools.flag_table"


def test_every_flag_appears_in_the_flag_page():
    import dataclasses

    text = flag_table.PAGE.read_text(encoding="utf-8")
    for config_cls in flag_table.TABLES.values():
        for field in dataclasses.fields(config_cls):
            assert f"`--{field.name}`" in text
