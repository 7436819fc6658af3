"""README.md stays true: its flag table is the one the absl definitions generate."""

from __future__ import annotations

from tools import flag_table


def test_readme_flag_table_matches_the_flag_definitions():
    current = flag_table.README.read_text(encoding="utf-8")
    assert flag_table.START in current and flag_table.END in current
    assert flag_table.render(current) == current, "run: python -m tools.flag_table"


def test_every_flag_appears_in_readme():
    import dataclasses

    from wake2vec.config import TrainConfig

    text = flag_table.README.read_text(encoding="utf-8")
    for field in dataclasses.fields(TrainConfig):
        assert f"`--{field.name}`" in text
