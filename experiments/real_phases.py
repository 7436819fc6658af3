"""The study's three phases in sequence on a real pretrained model (SmolLM2-135M-Instruct, GGUF).

    python -m experiments.real_phases                       # -> runs/real_phases, reports in docs/real_phases
    python -m experiments.real_phases --p1_steps=4 --p2_steps=2 --p3_steps=2 --out=/tmp/rp --docs=/tmp/rp/docs

Phase 1 trains the Wake rows (the library's loop, whole_word injection), Phase 2 trains LoRA
adapters over the frozen Phase 1 table, Phase 3 trains those adapters and the Wake rows
under the LM loss plus the alignment terms, with affix groups built from the lexicon. Each
phase is its library entry point (loop.run, phase2.run, phase3.run) with its own workdir in
--out; each starts from the previous one's last checkpoint (`latest`: the table and adapters
the previous phase ended with, so the tables below chain). Into --docs it writes:

* phases.md: the command; per phase its LM-only validation loss (overall, new-token and
  base-token targets, windows with and without Wake tokens) at its start and end, and its
  CPU-seconds; the adapter norms of Phases 2 and 3; Phase 3's groups, morphology
  consistency before and after, the base-row check and the Wake rows' movement;
* results.json: every number above, and the settings;
* loss_table_p{1,2,3}.md, loss_curve_p{1,2,3}.png, adapter_norms_p{2,3}.png, morphology.png.

The recipe is scaled to the 2-core CPU: 256-token blocks, 4 blocks per step, Phase 1 at
Adafactor 5e-4 (the reference's), Phases 2 and 3 at 2e-4 (the study's 2e-5 is a rate for
thousands of steps: AdamW moves each adapter weight by about the learning rate per step and
B starts at zero, so 40 steps at 2e-5 move no entry of B by more than about 8e-4, ten times
less than 2e-4 does), float32 throughout,
validation on the first 16 held-out blocks. No device groups exist for the Wake yet, so the
device term is off (--lambda_device=0 in Phase 3).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import sys
import time
from typing import Callable, ClassVar

import numpy as np

from experiments import real_model
from wake2vec import launcher
from wake2vec.training import workdir as records
from wake2vec.config import Phase2Config, Phase3Config

SHARED = real_model.SHARED


@dataclasses.dataclass(frozen=True)
class RealPhasesConfig:
    """Settings of the three-phase real-model experiment; one field per flag."""

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("out", "docs", "model", "corpus", "lexicon")

    # Output directory: one workdir per phase (p1, p2, p3).
    out: str = "runs/real_phases"
    # Where the reports go: phases.md, results.json, loss tables and figures.
    docs: str = "docs/real_phases"
    # The model: a Llama .gguf file or HF checkpoint dir (default: SmolLM2-135M-Instruct Q4_1 in ../shared/data).
    model: str = real_model.RealModelConfig.model
    # The Wake's text (UTF-8).
    corpus: str = real_model.RealModelConfig.corpus
    # The Wake lexicon, one word per line.
    lexicon: str = real_model.RealModelConfig.lexicon
    # Start the corpus at this text, as the reference did.
    start_marker: str = "riverrun"
    # Injection mode of Phase 1: whole_word (one token per lexicon word, no collateral) or reference.
    injection: str = "whole_word"
    # Tokens per block (the reference's 256).
    seq_len: int = 256
    # Blocks per microbatch, in every phase.
    batch_size: int = 4
    # Microbatches per optimizer step, in every phase.
    grad_accum: int = 1
    # Validation blocks (the first N held-out ones), in every phase.
    eval_blocks: int = 16
    # Validation every N steps, in every phase (and at each phase's first and last step).
    eval_every: int = 20
    # Log the training loss every N steps.
    log_every: int = 5
    # Rematerialisation: none | full | dots (none is fastest when memory allows).
    remat: str = "none"
    # Phase 1: optimizer steps and peak learning rate of the table (Adafactor, the reference's 5e-4).
    p1_steps: int = 60
    p1_lr: float = 5e-4
    # Phase 2: optimizer steps and peak learning rate of the adapters (AdamW; the study's 2e-5 needs thousands of steps).
    p2_steps: int = 40
    p2_lr: float = 2e-4
    # Phase 3: optimizer steps, the adapters' and the Wake rows' peak learning rates.
    p3_steps: int = 40
    p3_lr: float = 2e-4
    p3_wake_lr: float = 5e-4
    # Phase 3's alignment weights (the device term is off: no device groups for the Wake exist yet).
    lambda_morph: float = 0.1
    lambda_rep: float = 0.05
    lambda_norm: float = 0.01
    # Seeds every phase.
    seed: int = 0


def phase1_config(cfg: RealPhasesConfig, workdir: pathlib.Path):
    """Phase 1's TrainConfig: real_model's recipe with this experiment's settings (its
    table analysis is left out: Phase 3's report analyses the table it ends with)."""
    study = real_model.RealModelConfig(
        model=cfg.model, corpus=cfg.corpus, lexicon=cfg.lexicon, start_marker=cfg.start_marker, seq_len=cfg.seq_len,
        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, lr=cfg.p1_lr, eval_every=cfg.eval_every,
        log_every=cfg.log_every, eval_blocks=cfg.eval_blocks, remat=cfg.remat, seed=cfg.seed)
    return dataclasses.replace(real_model.train_config(study, cfg.injection, study.init, workdir, cfg.p1_steps), analyze=False)


def _adapter_run(cfg: RealPhasesConfig, steps: int) -> dict:
    """The settings Phases 2 and 3 share: the CPU schedule, float32, one checkpoint."""
    return dict(batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, max_steps=steps, eval_every=cfg.eval_every,
                save_every=max(steps, 1), log_every=cfg.log_every, eval_blocks=cfg.eval_blocks, keep=1, remat=cfg.remat,
                frozen_dtype="float32", compute_dtype="float32", seed=cfg.seed)


def phase2_config(cfg: RealPhasesConfig, workdir: pathlib.Path, phase1: pathlib.Path) -> Phase2Config:
    return Phase2Config(workdir=str(workdir), phase1=str(phase1), phase1_step="latest", lr=cfg.p2_lr,
                        **_adapter_run(cfg, cfg.p2_steps))


def phase3_config(cfg: RealPhasesConfig, workdir: pathlib.Path, phase2: pathlib.Path) -> Phase3Config:
    return Phase3Config(workdir=str(workdir), phase2=str(phase2), phase2_step="latest", lr=cfg.p3_lr,
                        wake_lr=cfg.p3_wake_lr, lambda_morph=cfg.lambda_morph, lambda_device=0.0,
                        lambda_rep=cfg.lambda_rep, lambda_norm=cfg.lambda_norm, **_adapter_run(cfg, cfg.p3_steps))


def timed(fn: Callable, *args) -> tuple[object, dict]:
    """fn(*args) and the CPU-seconds (user + system, every thread of this process) and wall time it took."""
    before, start = os.times(), time.monotonic()
    result = fn(*args)
    after = os.times()
    user, system = after.user - before.user, after.system - before.system
    return result, {"cpu_s": round(user + system, 1), "user_s": round(user, 1), "system_s": round(system, 1),
                    "wall_s": round(time.monotonic() - start, 1)}


def validation(workdir: pathlib.Path) -> dict:
    """The phase's first and last evaluation (wake2vec.analysis.phases' reading of metrics.jsonl)."""
    from wake2vec.analysis import phases

    return phases.validation_change(records.read_metrics(workdir))


def adapter_summary(norms: dict) -> dict:
    """projection -> mean and max over layers of the update norm ||(alpha/r) A B||_F."""
    return {name: {"mean": float(np.mean(v["update"])), "max": float(np.max(v["update"]))} for name, v in norms.items()}


def collect(workdirs: dict[str, pathlib.Path], cost: dict[str, dict]) -> dict:
    """Every number of the report, read from the three workdirs."""
    p2 = json.loads((workdirs["p2"] / "analysis" / "phase2.json").read_text())
    p3 = json.loads((workdirs["p3"] / "analysis" / "phase3.json").read_text())
    p1_record, p3_record = records.read_config(workdirs["p1"]), records.read_config(workdirs["p3"])
    return {
        "phases": {name: {"validation": validation(w), "cost": cost[name]} for name, w in workdirs.items()},
        "vocab": p1_record["vocab"],
        "data": p3_record["data"],
        "phase2": {"table": p2["table"], "adapter_norms": adapter_summary(p2["adapter_norms"]), "lora": p2["lora"]},
        "phase3": {"groups": {k: v for k, v in p3_record["groups"].items() if k != "norm_band"},
                   "norm_band": p3_record["groups"]["norm_band"], "base_rows": p3["base_rows"], "wake_rows": p3["wake_rows"],
                   "adapter_norms": adapter_summary(p3["adapter_norms"]), "morphology": p3.get("morphology")},
    }


def _loss(value) -> str:
    return "–" if value is None else f"{value:.4f}"


PHASE_TITLES = {"p1": "Phase 1 (Wake rows)", "p2": "Phase 2 (LoRA, table frozen)", "p3": "Phase 3 (LoRA + Wake rows + alignment)"}
TARGETS = {"val_loss": "all", "val_loss_new": "new (Wake) targets", "val_loss_base": "base targets",
           "val_loss_wake_windows": "windows with Wake tokens", "val_loss_plain_windows": "windows without"}


def validation_table(results: dict) -> str:
    rows = []
    for name, phase in results["phases"].items():
        v = phase["validation"]
        for when, step_key in (("before", "before_step"), ("after", "after_step")):
            rows.append([PHASE_TITLES[name], f"step {v[step_key]}"]
                        + [f"{_loss(v['losses'][field][when])} ({v['losses'][field]['tokens']:,})" for field in TARGETS])
    return real_model._md_table(["phase", "eval"] + list(TARGETS.values()), rows)


def morphology_table(morphology: dict) -> str:
    pre, post = morphology["pre"]["consistency"], morphology["post"]["consistency"]
    rows = [[f"`{name}`", n, f"{a:.4f}", f"{b:.4f}", f"{b - a:+.4f}"]
            for name, n, a, b in zip(morphology["morph_groups"], post["pairs_per_group"], pre["per_group"], post["per_group"])]
    rows += [["mean over pairs", sum(post["pairs_per_group"]), f"{pre['mean_over_pairs']:.4f}", f"{post['mean_over_pairs']:.4f}",
              f"{post['mean_over_pairs'] - pre['mean_over_pairs']:+.4f}"],
             ["mean over groups", "", f"{pre['mean_over_groups']:.4f}", f"{post['mean_over_groups']:.4f}",
              f"{post['mean_over_groups'] - pre['mean_over_groups']:+.4f}"]]
    return real_model._md_table(["group", "pairs measured", "before Phase 3", "after", "change"], rows)


def markdown(cfg: RealPhasesConfig, results: dict, command: str) -> str:
    """phases.md."""
    cost = results["phases"]
    vocab, data, p2, p3 = results["vocab"], results["data"], results["phase2"], results["phase3"]
    g = p3["groups"]
    steps = f"Phase 1 {cfg.p1_steps}, Phase 2 {cfg.p2_steps}, Phase 3 {cfg.p3_steps} steps"
    cost_rows = [[PHASE_TITLES[n], f"{c['cost']['cpu_s']:,.0f}", f"{c['cost']['user_s']:,.0f}", f"{c['cost']['system_s']:,.0f}",
                  f"{c['cost']['wall_s']:,.0f}"] for n, c in cost.items()]
    norm_rows = [[f"`{name}`", f"{p2['adapter_norms'][name]['mean']:.4g}", f"{p2['adapter_norms'][name]['max']:.4g}",
                  f"{p3['adapter_norms'][name]['mean']:.4g}", f"{p3['adapter_norms'][name]['max']:.4g}"] for name in p2["adapter_norms"]]
    built = g.get("built") or {}
    return "\n".join([
        "# Phases 1, 2 and 3 on SmolLM2-135M-Instruct (Q4_1 GGUF), at CPU scale", "",
        f"Written by `{command}`.", "",
        f"Injection `{vocab['injection']}`: {vocab['added']:,} new tokens over a base vocabulary of {vocab['base_size']:,}. "
        f"{data['train_blocks']:,} training / {data['val_blocks']:,} validation blocks of {data['seq_len']} tokens "
        f"(Phase 1's split, rebuilt by Phases 2 and 3); {cfg.batch_size} x {cfg.grad_accum} blocks per step; {steps}; "
        f"learning rates {cfg.p1_lr:g} (Phase 1, Adafactor), {cfg.p2_lr:g} (Phase 2, AdamW), {cfg.p3_lr:g} adapters / "
        f"{cfg.p3_wake_lr:g} Wake rows (Phase 3); float32; validation on the first {cfg.eval_blocks} held-out blocks. "
        "Each phase starts from the previous one's last checkpoint.", "",
        "## Validation loss (the LM loss alone), at each phase's start and end", "",
        "nats/token, with the number of predicted tokens. A window is a run of 32 targets; 'with Wake tokens' means "
        "one of its targets is a new token.", "",
        validation_table(results),
        "## CPU cost", "",
        "CPU-seconds of this process (user + system, all threads) per phase, on the shared 2-core machine:", "",
        real_model._md_table(["phase", "CPU-s", "user", "system", "wall s"], cost_rows),
        "## Phase 2: the table and the adapters", "",
        f"Table unchanged, verified bit for bit: sha256 `{p2['table']['sha256'][:16]}...` = the Phase 1 checkpoint at step "
        f"{p2['table']['phase1_checkpoint']['step']}; padding rows zero: {p2['table']['padding_rows_zero']}. Adapters: rank "
        f"{p2['lora']['rank']}, alpha {p2['lora']['alpha']:g}, dropout {p2['lora']['dropout']:g} on "
        f"{', '.join(p2['lora']['targets'])}.", "",
        "Adapter update norms ||(alpha/r) A B||_F over the 30 layers, at the end of Phase 2 and of Phase 3:", "",
        real_model._md_table(["projection", "Phase 2 mean", "Phase 2 max", "Phase 3 mean", "Phase 3 max"], norm_rows),
        "## Phase 3: groups, morphology, rows", "",
        f"Affix groups built from the lexicon and the base vocabulary: {g['morph_groups']} groups "
        f"({', '.join(g['group_names']['morph'])}), {g['morph_pairs']:,} (Wake word, base word) pairs, of which "
        f"{g['morph_pairs_touching_trainable']:,} touch a trainable (Wake) row; no device groups (device term off)."
        + (f" Builder counts: {json.dumps(built)}." if built else ""), "",
        f"Base rows unchanged, verified bit for bit ({p3['base_rows']['rows']:,} rows). Wake rows ({p3['wake_rows']['rows']:,}) "
        f"moved by {p3['wake_rows']['movement_l2_mean']:.4g} on average (L2; max {p3['wake_rows']['movement_l2_max']:.4g}).", "",
        "Morphology consistency (wake2vec.analysis.morphology: mean cosine of each group's offsets v(word) - v(base) to "
        "their mean direction) before and after Phase 3:", "",
        morphology_table(p3["morphology"]) if p3["morphology"] else "(not measured)\n",
        "Figures: loss_curve_p1.png, loss_curve_p2.png, loss_curve_p3.png, adapter_norms_p2.png, adapter_norms_p3.png, "
        "morphology.png; loss tables: loss_table_p1.md, loss_table_p2.md, loss_table_p3.md.", "",
    ])


def write_reports(cfg: RealPhasesConfig, workdirs: dict[str, pathlib.Path], results: dict) -> None:
    docs = pathlib.Path(cfg.docs)
    docs.mkdir(parents=True, exist_ok=True)
    for name, workdir in workdirs.items():
        shutil.copy(workdir / "loss_table.md", docs / f"loss_table_{name}.md")
        shutil.copy(workdir / "loss_curve.png", docs / f"loss_curve_{name}.png")
        results["phases"][name]["loss_table"] = (workdir / "loss_table.md").read_text()
    for name in ("p2", "p3"):
        shutil.copy(workdirs[name] / "analysis" / "adapter_norms.png", docs / f"adapter_norms_{name}.png")
    shutil.copy(workdirs["p3"] / "analysis" / "morphology.png", docs / "morphology.png")
    command = "python -m experiments.real_phases " + " ".join(sys.argv[1:])
    (docs / "phases.md").write_text(markdown(cfg, results, command.strip()))
    (docs / "results.json").write_text(json.dumps({"command": command.strip(), "settings": dataclasses.asdict(cfg),
                                                   "results": results}, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def run(cfg: RealPhasesConfig) -> str:
    from wake2vec.training import loop
    from wake2vec.phases import phase2, phase3

    out = pathlib.Path(cfg.out)
    workdirs = {name: out / name for name in ("p1", "p2", "p3")}
    cost = {}
    logging.info("Phase 1: %d steps", cfg.p1_steps)
    _, cost["p1"] = timed(loop.run, phase1_config(cfg, workdirs["p1"]))
    logging.info("Phase 2: %d steps (%s CPU-s so far)", cfg.p2_steps, cost["p1"]["cpu_s"])
    _, cost["p2"] = timed(phase2.run, phase2_config(cfg, workdirs["p2"], workdirs["p1"]))
    logging.info("Phase 3: %d steps", cfg.p3_steps)
    _, cost["p3"] = timed(phase3.run, phase3_config(cfg, workdirs["p3"], workdirs["p2"]))
    for name, c in cost.items():
        logging.info("%s: %s", name, c)
    write_reports(cfg, workdirs, collect(workdirs, cost))
    return f"done: {out}, reports in {cfg.docs}"


if __name__ == "__main__":
    launcher.launch(RealPhasesConfig, run, __doc__)
