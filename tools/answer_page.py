"""Writes docs/results/phase1_answer.md: what Phase 1's runs say, computed from their workdirs.

    python -m tools.answer_page --runs=runs/A,runs/B [--sweep=runs/C,runs/D] [--out=docs/results/phase1_answer.md]

--runs are the main runs (one per init), --sweep the learning-rate sweep (a main run may be
one of its points). Each workdir's config.json and metrics.jsonl are read; nothing is run.
Those two files, and the run's analysis/summary.json where it has one (its drift and norms
of the rows training shows and of those it never shows), are copied into --archive/NAME/
(docs/results/phase1_runs by default), and the page names the archived copies in its
regenerating command, so it regenerates from committed files once the workdirs (checkpoints,
GBs) are gone.
The page's first paragraph answers the study's questions from the evaluations: does the
loss on seen Wake words fall below the base model's cost of spelling them, does the
held-out Wake text cost fewer nats per character than under the base model and by how much,
what happens to words the training blocks never hold under each init, and where the
validation curve turns. Runs that cover fewer than MIN_EPOCHS epochs of the training blocks
get a "Provisional" banner. Beside the page goes a figure (same name, .png) of the seen and
unseen new-token loss and the delta nats/char against step, one panel per main run.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import sys

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
MIN_EPOCHS = 2.0
# A change smaller than this (nats) between the first and last evaluation is "flat".
FLAT = 1e-3

_RUNS = flags.DEFINE_list("runs", [], "main Phase 1 workdirs (different inits), comma-separated")
_SWEEP = flags.DEFINE_list("sweep", [], "learning-rate sweep workdirs, comma-separated")
_OUT = flags.DEFINE_string("out", str(ROOT / "docs" / "results" / "phase1_answer.md"), "the page to write; the figure goes beside it")
_ARCHIVE = flags.DEFINE_string("archive", str(ROOT / "docs" / "results" / "phase1_runs"),
                               "folder that receives each run's config.json, metrics.jsonl and analysis/summary.json "
                               "(empty: read in place)")
# What the page is computed from: all that is archived of a run. The analysis is optional (--analyze=false runs).
RECORD_FILES = ("config.json", "metrics.jsonl")
SUMMARY = "analysis/summary.json"


def shown_path(path) -> str:
    """A workdir as the regenerating command names it: repo-relative from its runs/ folder on."""
    path = pathlib.Path(path)
    parts = path.parts
    if "runs" in parts:
        return "/".join(parts[len(parts) - 1 - parts[::-1].index("runs"):])
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def archive_run(workdir, archive: pathlib.Path) -> pathlib.Path:
    """archive/NAME holding the run's RECORD_FILES and SUMMARY (copied unless the workdir is that folder)."""
    workdir, target = pathlib.Path(workdir), archive / pathlib.Path(workdir).name
    if workdir.resolve() != target.resolve():
        for name in RECORD_FILES + ((SUMMARY,) if (workdir / SUMMARY).is_file() else ()):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(workdir / name, target / name)
    return target


def load_run(workdir) -> dict:
    """One workdir's record: its config, its eval events in step order, and the epochs it covered."""
    workdir = pathlib.Path(workdir)
    config = json.loads((workdir / "config.json").read_text(encoding="utf-8"))
    events = []
    for line in (workdir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # a damaged line (workdir.read_metrics skips it too)
    evals = sorted((e for e in events if e.get("val_loss") is not None), key=lambda e: e["step"])
    flags_ = config["flags"]
    steps = max((e["step"] for e in events), default=0)
    data = config["data"]
    tokens_seen = steps * flags_["batch_size"] * flags_["grad_accum"] * data["seq_len"]
    summary = json.loads((workdir / SUMMARY).read_text(encoding="utf-8")) if (workdir / SUMMARY).is_file() else None
    return {"name": workdir.name, "path": shown_path(workdir), "config": config, "evals": evals, "steps": steps,
            "summary": summary,
            "init": flags_.get("init"), "injection": flags_.get("injection"), "lr": flags_.get("lr"),
            "tokens_seen": tokens_seen,
            "train_tokens": data["train_blocks"] * data["seq_len"],
            "epochs": tokens_seen / (data["train_blocks"] * data["seq_len"])}


def _fmt(value, digits: int = 4, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _first_last(evals: list[dict], key: str):
    """(first, last) eval events that have `key` (not None), or None."""
    having = [e for e in evals if e.get(key) is not None]
    return (having[0], having[-1]) if having else None


def trend(evals: list[dict], key: str) -> str | None:
    """'rose', 'fell' or 'stayed flat' from the first to the last evaluation; None without two values."""
    ends = _first_last(evals, key)
    if ends is None or ends[0]["step"] == ends[1]["step"]:
        return None
    change = ends[1][key] - ends[0][key]
    return "rose" if change > FLAT else "fell" if change < -FLAT else "stayed flat"


def turn(evals: list[dict], key: str) -> tuple[int, int] | None:
    """(step of the lowest value, last step), or None without values."""
    having = [e for e in evals if e.get(key) is not None]
    if not having:
        return None
    return min(having, key=lambda e: e[key])["step"], having[-1]["step"]


def seen_word_answer(run: dict) -> str:
    ends = _first_last(run["evals"], "val_word_nats_seen")
    if ends is None or ends[1].get("base_word_nats_seen") is None:
        return f"{run['label']}: no seen Wake word in the validation blocks, so no comparison"
    last = ends[1]
    below = last["val_word_nats_seen"] < last["base_word_nats_seen"]
    started = ends[0]["val_word_nats_seen"] < ends[0]["base_word_nats_seen"]
    return (f"{run['label']}: {'yes' if below else 'no'}, at step {last['step']} a seen Wake word costs "
            f"{last['val_word_nats_seen']:.3f} nats against the base model's {last['base_word_nats_seen']:.3f} "
            f"({'below' if below else 'not below'} it; at step {ends[0]['step']} {ends[0]['val_word_nats_seen']:.3f}, "
            f"{'already below' if started else 'above'})")


def char_answer(run: dict) -> str:
    ends = _first_last(run["evals"], "delta_nats_per_char")
    if ends is None:
        return f"{run['label']}: no per-character figures in its evaluations"
    first, last = ends
    delta = last["delta_nats_per_char"]
    verdict = f"below the base by {-delta:.4f} nats/char" if delta < 0 else f"not below the base ({delta:+.4f} nats/char)"
    return (f"{run['label']}: {verdict} at step {last['step']} (Δ {first['delta_nats_per_char']:+.4f} at step "
            f"{first['step']}); bits/byte {first['val_bits_per_byte']:.4f} → {last['val_bits_per_byte']:.4f} against the "
            f"base's {last['base_bits_per_byte']:.4f}")


def unseen_answer(run: dict) -> str:
    wake = run["config"].get("wake_targets") or {}
    unseen, seen = trend(run["evals"], "val_loss_new_unseen"), trend(run["evals"], "val_loss_new_seen")
    share = wake.get("val_unseen_share")
    scope = (f" ({share:.1%} of the validation new-token targets, {wake.get('new_rows_never_in_training', 0):,} of "
             f"{wake.get('new_rows', 0):,} new rows never in training)") if share is not None else ""
    if unseen is None:
        return f"{run['label']}: no unseen-target loss at two evaluations{scope}"
    ends = _first_last(run["evals"], "val_loss_new_unseen")
    text = (f"{run['label']}: the loss on never-trained targets {unseen} "
            f"({ends[0]['val_loss_new_unseen']:.3f} → {ends[1]['val_loss_new_unseen']:.3f}){scope}")
    if seen is not None:
        s = _first_last(run["evals"], "val_loss_new_seen")
        text += f" while the seen targets' {seen} ({s[0]['val_loss_new_seen']:.3f} → {s[1]['val_loss_new_seen']:.3f})"
    return text


def turn_answer(run: dict) -> str:
    parts = []
    for key, label in (("val_loss", "validation loss"), ("delta_nats_per_char", "delta nats/char")):
        where = turn(run["evals"], key)
        if where is None:
            continue
        low, last = where
        at = {e["step"]: e[key] for e in run["evals"] if e.get(key) is not None}
        if low == last:
            parts.append(f"{label} lowest at the last evaluation (step {last}), no turn yet")
        elif at[last] - at[low] <= FLAT:
            parts.append(f"{label} flat: within {FLAT:g} of its lowest (step {low}) at the last evaluation (step {last})")
        else:
            parts.append(f"{label} turns at step {low} ({at[low]:.4f}), {at[last] - at[low]:+.4f} by step {last}")
    return f"{run['label']}: " + ("; ".join(parts) if parts else "no evaluations")


def needs_reading(run: dict) -> bool:
    """Unseen loss rising while the seen falls, or both rising: the case the Adafactor reading is about."""
    unseen, seen = trend(run["evals"], "val_loss_new_unseen"), trend(run["evals"], "val_loss_new_seen")
    return unseen == "rose" and seen in ("fell", "rose")


def label_runs(runs: list[dict]) -> None:
    """Each main run's name in the answers: its init, preceded by its injection where the runs use
    more than one, or its workdir where two runs share both."""
    several = len({r["injection"] for r in runs}) > 1
    keys = [(r["injection"], r["init"]) for r in runs]
    for run, key in zip(runs, keys):
        what = ", ".join(([f"`{run['injection']}`"] if several else []) + [f"`{run['init']}`"])
        run["label"] = what if keys.count(key) == 1 else f"`{run['name']}` ({what})"


def answer_paragraph(runs: list[dict]) -> str:
    label_runs(runs)
    join = lambda fn: "; ".join(fn(r) for r in runs)  # noqa: E731
    return (f"**Seen Wake words below the base model's spelling cost?** {join(seen_word_answer)}. "
            f"**Held-out Wake text per character against the base model:** {join(char_answer)}. "
            f"**Words no training block holds:** {join(unseen_answer)}. "
            f"**Where the curve turns:** {join(turn_answer)}.")


def banner(runs: list[dict]) -> str | None:
    most = max(runs, key=lambda r: r["epochs"])
    if most["epochs"] >= MIN_EPOCHS:
        return None
    flags_ = most["config"]["flags"]
    return (f"> **Provisional.** These runs cover at most {most['epochs']:.2f} epochs of the training blocks "
            f"({most['steps']} steps × {flags_['batch_size']} × {flags_['grad_accum']} blocks of "
            f"{most['config']['data']['seq_len']} tokens = {most['tokens_seen']:,} tokens over {most['train_tokens']:,} "
            f"training tokens), under the {MIN_EPOCHS:g} epochs the answers need; they can change with longer training.")


READING = ("*A reading, not a tested claim:* Adafactor normalises each update by the row's own running "
           "gradient scale, so a row that only ever receives negative (push-down) gradient, as a new row no "
           "training block holds does through the softmax, moves at least as far per step as a trained row "
           "(its gradient keeps one direction, so its steps do not cancel); a run's drift table, where it has "
           "one, measures how far each group moved. Such rows are pushed away from every context instead of "
           "toward theirs, which would make the unseen loss rise as the seen loss falls.")

EVAL_COLUMNS = (("Val loss", "val_loss"), ("New, seen", "val_loss_new_seen"), ("New, unseen", "val_loss_new_unseen"),
                ("Val nats/char", "val_nats_per_char"), ("Δ nats/char", "delta_nats_per_char"),
                ("Val bits/byte", "val_bits_per_byte"), ("Word seen", "val_word_nats_seen"),
                ("Base word seen", "base_word_nats_seen"), ("Word unseen", "val_word_nats_unseen"),
                ("Base word unseen", "base_word_nats_unseen"))


def evaluated_scope(run: dict) -> str:
    """What the evaluations read, from the first eval event: config.json's counts cover every
    validation block, an evaluation only the first --eval_blocks of them."""
    if not run["evals"] or run["evals"][0].get("val_tokens_new_seen") is None:
        return ""
    first, blocks = run["evals"][0], run["config"]["flags"].get("eval_blocks")
    read = f"the first {blocks} of {run['config']['data']['val_blocks']:,}" if blocks else "all"
    return (f" The evaluations read {read} validation blocks: {first['val_tokens_new_seen']:,} seen and "
            f"{first['val_tokens_new_unseen']:,} never-trained new-token targets, "
            f"{first.get('word_occurrences_seen', 0):,} seen and {first.get('word_occurrences_unseen', 0):,} unseen "
            "Wake-word occurrences.")


def eval_table(run: dict) -> str:
    lines = ["| Step | " + " | ".join(h for h, _ in EVAL_COLUMNS) + " |", "|--:" * (1 + len(EVAL_COLUMNS)) + "|"]
    for e in run["evals"]:
        cells = [_fmt(e.get(k), sign=k.startswith("delta")) for _, k in EVAL_COLUMNS]
        lines.append(f"| {e['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


COUNT_BUCKETS = (("1", "_1"), ("2-4", "_2_4"), ("5-19", "_5_19"), ("20+", "_20_plus"))


def count_table(run: dict) -> str | None:
    """The seen new-token loss by how often training shows the token, at the first and last
    evaluation (a dose-response: does a row need many sightings to learn?); None without the buckets."""
    evals = [e for e in run["evals"] if "val_tokens_new_seen_1" in e]
    if not evals:
        return None
    first, last = evals[0], evals[-1]
    lines = ["| Times in training | Targets | Loss at step " + f"{first['step']} | Loss at step {last['step']} | Change |",
             "|:--|--:|--:|--:|--:|"]
    for label, suffix in COUNT_BUCKETS:
        a, b = first.get(f"val_loss_new_seen{suffix}"), last.get(f"val_loss_new_seen{suffix}")
        change = b - a if a is not None and b is not None else None
        lines.append(f"| {label} | {last.get(f'val_tokens_new_seen{suffix}', 0):,} | {_fmt(a)} | {_fmt(b)} | "
                     f"{_fmt(change, sign=True)} |")
    return "\n".join(lines)


EXPOSURE_GROUPS = (("new_seen", "new rows a training block holds"), ("new_unseen", "new rows no training block holds"),
                   ("base", "base rows"))


def made_with(config: dict) -> str | None:
    """The run's recorded command line as a `python -m` command from the repository root, or None."""
    words = (config.get("command") or "").split()
    if not words:
        return None
    script = pathlib.Path(words[0])
    if script.suffix == ".py" and "experiments" in script.parts:
        words[0] = "python -m " + ".".join(script.parts[script.parts.index("experiments"):]).removesuffix(".py")
    return " ".join(words)


def exposure_table(run: dict) -> str | None:
    """How far each group of rows moved from step 0 to the analysed step, from the run's analysis;
    None without one, or without the seen / unseen split (an analysis given no training counts)."""
    summary = run["summary"] or {}
    drifts = summary.get("drift") or {}
    if not (drifts.get("new_seen") or drifts.get("new_unseen")):
        return None
    lines = ["| Rows | n | L2 drift, median (5%-95%) | cosine to step 0, median | norm at the end, median |",
             "|:--|--:|--:|--:|--:|"]
    for key, label in EXPOSURE_GROUPS:
        drift, norms = summary["drift"].get(key), summary["norms"].get(key)
        if not drift:
            lines.append(f"| {label} | 0 | – | – | – |")
            continue
        l2, cos = drift["l2"]["quantiles"], drift["cosine"]["quantiles"]
        lines.append(f"| {label} | {drift['l2']['n']:,} | {l2['0.5']:.4f} ({l2['0.05']:.4f}-{l2['0.95']:.4f}) | "
                     f"{cos['0.5']:.4f} | {_fmt(norms['quantiles']['0.5'] if norms else None)} |")
    return "\n".join(lines)


def sweep_table(sweep: list[dict]) -> str:
    lines = ["| lr | Run | Steps | Final val loss | Best val loss (step) | Final Δ nats/char | Best Δ nats/char (step) "
             "| Final new, seen | Final new, unseen |", "|--:|:--|--:|--:|--:|--:|--:|--:|--:|"]
    for run in sorted(sweep, key=lambda r: r["lr"]):
        evals = run["evals"]
        if not evals:
            lines.append(f"| {run['lr']:g} | `{run['path']}` | {run['steps']} | – | – | – | – | – | – |")
            continue
        best = min(evals, key=lambda e: e["val_loss"])
        deltas = [e for e in evals if e.get("delta_nats_per_char") is not None]
        best_d = min(deltas, key=lambda e: e["delta_nats_per_char"]) if deltas else None
        lines.append(f"| {run['lr']:g} | `{run['path']}` | {run['steps']} | {evals[-1]['val_loss']:.4f} | "
                     f"{best['val_loss']:.4f} ({best['step']}) | {_fmt(evals[-1].get('delta_nats_per_char'), sign=True)} | "
                     + (f"{best_d['delta_nats_per_char']:+.4f} ({best_d['step']})" if best_d else "–")
                     + f" | {_fmt(evals[-1].get('val_loss_new_seen'))} | {_fmt(evals[-1].get('val_loss_new_unseen'))} |")
    return "\n".join(lines)


def write_figure(runs: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), dpi=100, squeeze=False)
    for ax, run in zip(axes[0], runs):
        for key, label, color in (("val_loss_new_seen", "new tokens, seen in training", "tab:green"),
                                  ("val_loss_new_unseen", "new tokens, never in training", "tab:red")):
            points = [(e["step"], e[key]) for e in run["evals"] if e.get(key) is not None]
            if points:
                ax.plot(*zip(*points), "o-", label=label, color=color)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation loss (nats / token)")
        ax.set_title(f"{run['name']} ({run['injection']}, init {run['init']}, lr {run['lr']:g})")
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        points = [(e["step"], e["delta_nats_per_char"]) for e in run["evals"] if e.get("delta_nats_per_char") is not None]
        if points:
            twin.plot(*zip(*points), "s--", color="tab:blue", label="Δ nats/char vs base")
        twin.axhline(0.0, color="tab:blue", lw=0.6, alpha=0.5)
        twin.set_ylabel("Δ nats/char (run − base)")
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render(runs: list[dict], sweep: list[dict], command: str, figure_name: str) -> str:
    parts = ["# Phase 1: what the runs answer", ""]
    note = banner(runs + sweep)
    if note:
        parts += [note, ""]
    parts += [answer_paragraph(runs), "", f"Regenerate with `{command}` (it reads each run's config.json, "
              "metrics.jsonl and analysis/summary.json, archived there; it trains nothing).", ""]
    if any(needs_reading(r) for r in runs):
        parts += [READING, ""]
    parts += [f"![seen and unseen new-token loss, delta nats/char against step]({figure_name})", ""]
    for run in runs:
        flags_, wake = run["config"]["flags"], run["config"].get("wake_targets") or {}
        parts += [f"## `{run['path']}`: injection `{run['injection']}`, init `{run['init']}`, lr {run['lr']:g}", "",
                  f"{run['steps']} steps of {flags_['batch_size']} × {flags_['grad_accum']} blocks of "
                  f"{run['config']['data']['seq_len']} tokens: {run['epochs']:.2f} epochs of "
                  f"{run['config']['data']['train_blocks']:,} training blocks. Never in training: "
                  f"{wake.get('new_rows_never_in_training', '–')} of {wake.get('new_rows', '–')} new rows, "
                  f"{wake.get('val_new_targets_unseen', '–')} of {wake.get('val_new_targets', '–')} validation new-token "
                  f"targets.{evaluated_scope(run)} Losses in nats per token, word costs in nats per occurrence."
                  + (f" Made with `{made}`." if (made := made_with(run["config"])) else ""), "",
                  eval_table(run), ""]
        by_count = count_table(run)
        if by_count:
            parts += ["The seen new-token targets by how many times their token occurs in the training blocks:", "",
                      by_count, ""]
        moved = exposure_table(run)
        if moved:
            parts += [f"How far the rows moved from the step-0 table to the end of the run (step {run['steps']}; "
                      "the run's analysis/summary.json). A row no training block holds gets only the softmax's "
                      "push-down.", "", moved, ""]
    if sweep:
        parts += ["## Learning-rate sweep", "", sweep_table(sweep), ""]
        commands = [made_with(r["config"]) for r in sorted(sweep, key=lambda r: r["lr"])]
        if any(commands):
            parts += ["Made with:", "", *(f"* `{c}`" for c in commands if c), ""]
    return "\n".join(parts)


def command_line(runs: list[dict], sweep: list[dict], out: pathlib.Path) -> str:
    words = ["python -m tools.answer_page", "--runs=" + ",".join(r["path"] for r in runs)]
    if sweep:
        words.append("--sweep=" + ",".join(r["path"] for r in sweep))
    words.append(f"--out={shown_path(out)}")
    return " ".join(words)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _RUNS.value:
        raise app.UsageError("--runs=DIR[,DIR...] is required")
    keep = (lambda d: archive_run(d, pathlib.Path(_ARCHIVE.value))) if _ARCHIVE.value else pathlib.Path
    runs = [load_run(keep(d)) for d in _RUNS.value]
    sweep = [load_run(keep(d)) for d in _SWEEP.value]
    out = pathlib.Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = out.with_suffix(".png")
    write_figure(runs, figure)
    out.write_text(render(runs, sweep, command_line(runs, sweep, out), figure.name), encoding="utf-8")
    print(f"wrote {out} and {figure}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
