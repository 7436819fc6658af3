"""What Phases 2 and 3 changed, and a check of what they must not have changed.

Phase 2 trains LoRA adapters only, so the analysis of Phase 1 (norms, drift, neighbours of
the table) has nothing to measure: the table is the Phase 1 table by construction. The
study computed a "drift" of zero anyway and reported it. Here the table is *verified*
instead, bit for bit (sha256 of its float32 bytes against the Phase 1 checkpoint it came
from, and its padding rows still zero), and the report shows what Phase 2 does change:

* the size of each adapter's update ||(alpha / r) A B||_F per layer and projection (and
  ||A||, ||B||), as JSON and one figure;
* the validation loss before and after, overall, by target type, and in windows with and
  without Wake tokens (wake2vec.training.train.EVAL_CATEGORIES), read from metrics.jsonl.

Files: workdir/analysis/phase2.json, phase2.md, adapter_norms.png.

Phase 3 trains the Wake rows too, so its report checks the *base* rows bit for bit
against the table it started from, runs Phase 1's table analysis on the trained table
(against that start) with the morphology section (wake2vec.analysis.morphology: direction
consistency of each morpheme group and device-group separation, before and after), and
adds the adapters and the validation change as for Phase 2: analysis/phase3.json,
phase3.md, summary.json, embedding_analysis.png, morphology.png, adapter_norms.png.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

from wake2vec.training import hosts, train, workdir as records
from wake2vec.models import lora
from wake2vec.models import padding

NORMS_FIGURE = "adapter_norms.png"
VAL_FIELDS = tuple("val_loss" if c == "all" else f"val_loss_{c}" for c in train.EVAL_CATEGORIES)


class TableChangedError(RuntimeError):
    """The frozen table differs from the Phase 1 table it was loaded from: a bug, not a user error."""


def verify_frozen_table(frozen: dict, record: dict) -> dict:
    """The table check: the frozen table and head now, unpadded, hash as recorded at the start,
    and their padding rows are zero. Collective (every process gathers the table)."""
    from wake2vec.phases import runs

    total = int(record["vocab"]["total"])
    padded = {k: hosts.host_array(frozen[k]) if k == "embedding" else {"kernel": hosts.host_array(frozen[k]["kernel"])}
              for k in ("embedding", "lm_head") if k in frozen}
    real = padding.unpad(padded, total)
    digest = runs.table_sha256(real)
    padding_zero = bool(np.all(padded["embedding"][total:] == 0))
    if "lm_head" in padded:
        padding_zero = padding_zero and bool(np.all(padded["lm_head"]["kernel"][:, total:] == 0))
    expected = record["phase1_table_sha256"]
    if digest != expected or not padding_zero:
        raise TableChangedError(f"the frozen table changed during Phase 2 (sha256 {digest[:16]}... vs the Phase 1 "
                                f"checkpoint's {expected[:16]}...; padding rows zero: {padding_zero})")
    return {"unchanged": True, "sha256": digest, "phase1_checkpoint": record["phase1"], "padding_rows_zero": padding_zero,
            "how": "sha256 of the float32 table (and an untied head) after the last step, against the Phase 1 checkpoint's"}


def validation_change(events: list[dict]) -> dict:
    """The first and last evaluation's losses (overall, by target type, by window) and their change."""
    evals = [e for e in events if "val_loss" in e]
    if not evals:
        return {}
    first, last = evals[0], evals[-1]
    rows = {}
    for field in VAL_FIELDS:
        before, after = first.get(field), last.get(field)
        tokens = last.get(field.replace("val_loss", "val_tokens"))
        change = None if before is None or after is None else after - before
        rows[field] = {"before": before, "after": after, "change": change, "tokens": tokens}
    return {"before_step": first["step"], "after_step": last["step"], "losses": rows}


def plot_adapter_norms(norms: dict, path: pathlib.Path, phase: int) -> None:
    """One line per projection: the update norm ||scale A B||_F by layer."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5), dpi=100)
    ax = fig.add_subplot()
    for name, per_layer in norms.items():
        ax.plot(range(len(per_layer["update"])), per_layer["update"], "o-", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("||(alpha / r) A B||_F")
    ax.set_title(f"Phase {phase}: size of each adapter's update, by layer and projection")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)


def _markdown(report: dict, table_line: str) -> str:
    lines = [f"# Phase {report['phase']}: what changed", "", table_line, ""]
    change = report.get("validation", {})
    if change:
        lines += [f"Validation loss, step {change['before_step']} -> step {change['after_step']} (the LM loss alone):", "",
                  "| Targets | Before | After | Change | Predictions |", "|:--|--:|--:|--:|--:|"]
        for field, row in change["losses"].items():
            cells = ["–" if row[k] is None else f"{row[k]:+.4f}" if k == "change" else f"{row[k]:.4f}"
                     for k in ("before", "after", "change")]
            lines.append(f"| {field} | {' | '.join(cells)} | {row['tokens'] if row['tokens'] is not None else '–'} |")
        lines.append("")
    lines += ["Adapter update norms ||(alpha/r) A B||_F, mean over layers:", "", "| Projection | Mean | Max |", "|:--|--:|--:|"]
    for name, per_layer in report["adapter_norms"].items():
        lines.append(f"| {name} | {np.mean(per_layer['update']):.4g} | {np.max(per_layer['update']):.4g} |")
    return "\n".join(lines) + "\n"


def _write(workdir: pathlib.Path, report: dict, table_line: str) -> None:
    if not hosts.is_writer():
        return
    out = workdir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    name = f"phase{report['phase']}"
    records.atomic_write_text(out / f"{name}.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    records.atomic_write_text(out / f"{name}.md", _markdown(report, table_line))
    plot_adapter_norms(report["adapter_norms"], out / NORMS_FIGURE, report["phase"])


def _adapter_fields(state: train.TrainState, spec: lora.LoraSpec) -> dict:
    adapters = jax.tree_util.tree_map(hosts.host_array, state.trainable["lora"])
    return {"lora": {"targets": list(spec.targets), "rank": spec.rank, "alpha": spec.alpha, "dropout": spec.dropout},
            "adapter_norms": lora.adapter_norms(adapters, spec)}


def write_phase2_report(workdir: pathlib.Path, state: train.TrainState, frozen: dict, record: dict, spec: lora.LoraSpec) -> dict:
    """Verifies the table, measures the adapters, writes the report; returns it (on every process)."""
    table = verify_frozen_table(frozen, record)
    report = {"phase": 2, "step": int(state.step), "table": table, **_adapter_fields(state, spec),
              "validation": validation_change(records.read_metrics(workdir))}
    _write(workdir, report, f"Table: unchanged, verified bit for bit (sha256 `{table['sha256'][:16]}...` = the Phase 1 "
                            f"checkpoint at step {table['phase1_checkpoint']['step']}).")
    return report


def write_phase3_report(workdir: pathlib.Path, state: train.TrainState, table_start: np.ndarray, record: dict,
                        spec: lora.LoraSpec, data, tokenizer, train_counts=None) -> dict:
    """Checks the base rows, analyses the trained table (morphology included) against the
    start, measures the adapters, writes the report; returns it (on every process).
    `train_counts` (per row, from the training blocks) splits the new rows seen / never seen."""
    from wake2vec.analysis import report as table_report

    total, base_size = int(record["vocab"]["total"]), int(record["vocab"]["base_size"])
    table = padding.unpad_table(hosts.host_array(state.trainable["embedding"]), total)
    if not np.array_equal(table[:base_size], table_start[:base_size]):
        moved = int(np.sum(np.any(table[:base_size] != table_start[:base_size], axis=1)))
        raise TableChangedError(f"{moved} base rows moved during Phase 3; they are masked, so this is a bug")
    wake_moved = np.linalg.norm(table[base_size:] - table_start[base_size:], axis=1)
    report = {
        "phase": 3, "step": int(state.step),
        "base_rows": {"unchanged": True, "rows": base_size, "how": "bitwise equality with the table Phase 3 started from"},
        "wake_rows": {"rows": total - base_size, "movement_l2_mean": float(wake_moved.mean()) if wake_moved.size else 0.0,
                      "movement_l2_max": float(wake_moved.max()) if wake_moved.size else 0.0},
        **_adapter_fields(state, spec),
        "validation": validation_change(records.read_metrics(workdir)),
    }
    if hosts.is_writer():
        tokens = tokenizer.convert_ids_to_tokens(list(range(total)))
        summary = table_report.run_analysis(table, base_size, workdir / "analysis", E_pre=table_start, tokens=tokens, seed=0,
                                            source={"workdir": str(workdir), "step": int(state.step), "phase": 3},
                                            groups=data, group_names=record["groups"]["group_names"],
                                            train_counts=train_counts)
        report["morphology"] = summary.get("morphology")
    _write(workdir, report, f"Base rows: unchanged, verified bit for bit ({base_size:,} rows). Wake rows moved by "
                            f"{report['wake_rows']['movement_l2_mean']:.4g} on average (L2).")
    return report
