"""Regenerates docs/flags.md's tables of the training launchers' flags from the absl definitions.

    python -m tools.flag_table          # rewrite the tables in docs/flags.md
    python -m tools.flag_table --check  # exit 1 if docs/flags.md is out of date

Each table sits between its markers below; tests/test_docs.py fails when one drifts.
"""

from __future__ import annotations

import pathlib
import sys

from wake2vec import flags as config_flags
from wake2vec.config import Phase2Config, Phase3Config, TrainConfig

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "flags.md"
# marker name -> the config whose flags the table lists
TABLES = {"flags": TrainConfig, "flags_p2": Phase2Config, "flags_p3": Phase3Config}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def render(page_text: str) -> str:
    for name, config_cls in TABLES.items():
        start, end = markers(name)
        head, rest = page_text.split(start, 1)
        _, tail = rest.split(end, 1)
        page_text = f"{head}{start}\n{config_flags.markdown_table(config_cls)}\n{end}{tail}"
    return page_text


def main() -> int:
    current = PAGE.read_text(encoding="utf-8")
    updated = render(current)
    if "--check" in sys.argv[1:]:
        if updated != current:
            print("docs/flags.md's flag tables are out of date: run python -m tools.flag_table", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(updated, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
