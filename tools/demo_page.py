"""Reruns the embedded demo and rewrites what docs/results/demo.md and the README show of it.

    python -m tools.demo_page [--workdir=runs/demo_page]

Runs `python -m experiments.train_p1 --workdir=DIR` in a fresh process (DIR is emptied first), then
writes between the page's markers the rows of DIR/loss_table.md at every 100th step and a line of
facts read from DIR/metrics.jsonl, and copies DIR/loss_curve.png and DIR/analysis/embedding_analysis.png
to docs/demo_loss_curve.png and docs/demo_embedding_analysis.png. The CPU-seconds quoted are the
child process's user + sys time.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "results" / "demo.md"
START, END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"
EVERY = 100


def run_demo(workdir: pathlib.Path) -> tuple[float, float]:
    """(CPU-seconds, wall seconds) of one demo run."""
    if workdir.exists():
        shutil.rmtree(workdir)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "experiments.train_p1", f"--workdir={workdir}"], cwd=ROOT, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, wall


def table_rows(loss_table: str) -> str:
    lines = [line for line in loss_table.splitlines() if line.startswith("|")]
    header, rule, rows = lines[0], lines[1], lines[2:]
    kept = [row for row in rows if int(row.split("|")[1]) % EVERY == 0]
    return "\n".join([header, rule, *kept])


def facts(metrics_path: pathlib.Path) -> str:
    evals = [e for e in map(json.loads, metrics_path.read_text().splitlines()) if "val_loss" in e]
    best = min(evals, key=lambda e: e["val_loss"])
    last = evals[-1]
    return (f"Lowest validation loss {best['val_loss']:.4f} at step {best['step']} of {last['step']}; "
            f"at the last evaluation {last['val_loss']:.4f}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=pathlib.Path, default=ROOT / "runs" / "demo_page")
    args = parser.parse_args()
    cpu_s, wall_s = run_demo(args.workdir)
    block = "\n".join([
        START,
        f"Written by `python -m tools.demo_page` (the demo run took {cpu_s:.1f} CPU-s, user + sys, "
        f"{wall_s:.1f} s wall). Every {EVERY}th step of `DIR/loss_table.md`:",
        "",
        table_rows((args.workdir / "loss_table.md").read_text()),
        "",
        facts(args.workdir / "metrics.jsonl"),
        END,
    ])
    page = PAGE.read_text()
    if START not in page or END not in page:
        raise SystemExit(f"{PAGE}: the markers {START} and {END} are missing")
    PAGE.write_text(page[: page.index(START)] + block + page[page.index(END) + len(END):])
    shutil.copyfile(args.workdir / "loss_curve.png", ROOT / "docs" / "demo_loss_curve.png")
    shutil.copyfile(args.workdir / "analysis" / "embedding_analysis.png", ROOT / "docs" / "demo_embedding_analysis.png")
    print(f"wrote {PAGE.relative_to(ROOT)} and the two figures ({cpu_s:.1f} CPU-s)")


if __name__ == "__main__":
    main()
