"""Regenerates README.md's table of train_p1 flags from the absl definitions.

    python -m tools.flag_table          # rewrite the table in README.md
    python -m tools.flag_table --check  # exit 1 if README.md is out of date

The table sits between the markers below; tests/test_docs.py fails when it drifts.
"""

from __future__ import annotations

import pathlib
import sys

from wake2vec import flags as config_flags
from wake2vec.config import TrainConfig

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- flags:start -->", "<!-- flags:end -->"


def render(readme_text: str) -> str:
    head, rest = readme_text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{config_flags.markdown_table(TrainConfig)}\n{END}{tail}"


def main() -> int:
    current = README.read_text(encoding="utf-8")
    updated = render(current)
    if "--check" in sys.argv[1:]:
        if updated != current:
            print("README.md's flag table is out of date: run python -m tools.flag_table", file=sys.stderr)
            return 1
        return 0
    README.write_text(updated, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
