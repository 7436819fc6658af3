"""The study's Phase 1 on a real pretrained model (SmolLM2-135M-Instruct, from its GGUF file).

    python -m experiments.real_model                       # -> runs/real_model (the full run)
    python -m experiments.real_model --max_steps=40 --grad_accum=2 --out=runs/real_model_small
    python -m experiments.real_model --max_steps=0 --inits=mean_noise,subword_mean --out=runs/inits  # init tables only

For each injection mode (--injections) it writes, into --out:

* init_table.md: the step-0 evaluation of every initialiser (--inits), below the base
  model's figures on the same characters before injection: nats per character and its
  difference from the base (tokenizations are compared per character, since injection
  changes how many tokens a text is), bits per byte, the loss on new-token targets seen and
  never seen in training, the cost of a seen / unseen Wake word, and the init's CPU-seconds;
* a Phase 1 run (the library's own loop, --init) in MODE/phase1/: loss table, loss curve,
  checkpoint, analysis; copied up as loss_table.md and loss_curve.png;
* neighbours.md: the 5 nearest base tokens of chosen Wake words (--words, plus words from
  the beginning, middle and end of the lexicon), before and after training;
* generations.md: greedy continuations of the study's prompt by the base model, by the
  injected model at step 0, and by the trained model;
* results.json: every number above, and the settings.

The default recipe is the reference's scaled to about 20-30 CPU-minutes on 2 cores: 256-token
blocks as in the reference, 4 blocks per step instead of 16, 150 steps instead of 3,000
(150 x 1,024 = 154k tokens, about 0.4 of one pass over the Wake, against the reference's
12.3M tokens, about 34 passes), validation on the first 16 held-out blocks instead of all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
import tempfile
from typing import ClassVar

import numpy as np

from wake2vec.phases import base_cost, runs, prepare
from wake2vec.models import convert, generate
from wake2vec.training import loop, workdir as records
from wake2vec import launcher
from wake2vec.tokens import vocab
from wake2vec.analysis import metrics
from wake2vec.config import TrainConfig
from wake2vec.errors import UserError

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclasses.dataclass(frozen=True)
class RealModelConfig:
    """Settings of the real-model experiment; one field per flag."""

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("out", "model", "corpus", "lexicon")

    # Output directory: tables, figure, results.json, and one workdir per injection mode.
    out: str = "runs/real_model"
    # The model: a Llama .gguf file or HF checkpoint dir (default: SmolLM2-135M-Instruct Q4_1 in ../shared/data).
    model: str = str(SHARED / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    # The Wake's text (UTF-8).
    corpus: str = str(SHARED / "finnegans_wake.txt")
    # The Wake lexicon, one word per line.
    lexicon: str = str(SHARED / "wake_lexicon.txt")
    # Start the corpus at this text, as the reference did.
    start_marker: str = "riverrun"
    # Comma-separated injection modes: reference (the study's add_tokens) and/or whole_word.
    injections: str = "reference,whole_word"
    # Comma-separated initialisers whose step-0 validation loss is tabulated.
    inits: str = "mean_noise,spherical,subword_mean,hewitt"
    # Initialiser of the Phase 1 run.
    init: str = "mean_noise"
    # Tokens per block (the reference's 256).
    seq_len: int = 256
    # Blocks per microbatch.
    batch_size: int = 1
    # Microbatches per optimizer step (the reference: 16; scaled to the CPU budget).
    grad_accum: int = 4
    # Optimizer steps of the Phase 1 run (the reference: 3,000); 0 writes the init tables only.
    max_steps: int = 150
    # Peak learning rate (the reference's 5e-4).
    lr: float = 5e-4
    # Warmup fraction of max_steps.
    warmup_ratio: float = 0.05
    # Validation every N steps.
    eval_every: int = 25
    # Log the training loss every N steps.
    log_every: int = 5
    # Validation blocks (the first N held-out ones) for every loss in the tables and the run.
    eval_blocks: int = 16
    # Rematerialisation of the training step: none | full | dots (none is fastest when memory allows).
    remat: str = "none"
    # Comma-separated Wake words whose nearest base tokens are listed.
    words: str = "misunderstord,riverrun,commodius,vicus,Howth"
    # Lexicon words listed from each of its beginning, middle and end.
    words_per_segment: int = 2
    # Prompt of the generations.
    prompt: str = generate.STUDY_PROMPT
    # New tokens per generation.
    max_new_tokens: int = 48
    # Repetition penalty of the greedy generations (the study's 1.15; 1 is plain greedy).
    repetition_penalty: float = 1.15
    # Seeds the initialisers and the batch order.
    seed: int = 0


class StudyError(UserError, ValueError):
    """A setting of the real-model experiment cannot be run."""


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def train_config(cfg: RealModelConfig, mode: str, init: str, workdir, max_steps: int) -> TrainConfig:
    """The TrainConfig of one run of injection `mode`."""
    if mode not in vocab.INJECTION_MODES:
        raise StudyError(f"--injections: unknown mode {mode!r}; choose from {', '.join(vocab.INJECTION_MODES)}")
    return TrainConfig(
        workdir=str(workdir), model=cfg.model, corpus=cfg.corpus, lexicon=cfg.lexicon, start_marker=cfg.start_marker,
        seq_len=cfg.seq_len, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, max_steps=max_steps, lr=cfg.lr,
        warmup_ratio=cfg.warmup_ratio, init=init, eval_every=cfg.eval_every, save_every=max(max_steps, 1),
        log_every=cfg.log_every, eval_blocks=cfg.eval_blocks, remat=cfg.remat, seed=cfg.seed, keep=1, injection=mode,
    )


# The step-0 evaluation fields the init table shows, in its column order after the model's name.
INIT_COLUMNS = ("val_nats_per_char", "delta_nats_per_char", "val_bits_per_byte", "val_loss_new_seen",
                "val_loss_new_unseen", "val_word_nats_seen", "val_word_nats_unseen", "val_loss")


def init_table(cfg: RealModelConfig, mode: str, out: pathlib.Path) -> list[dict]:
    """Every initialiser's step-0 evaluation, after the base model's figures on the same characters.

    Each row is the step-0 evaluation event of the library's own loop: a one-step run in a
    scratch workdir whose step and checkpoint are discarded. So an init's row holds exactly
    what a Phase 1 run of it logs at step 0 (nats per character against the base model,
    seen / unseen Wake-target loss, word costs), measured by the code the runs use rather
    than by a second evaluator. The base model is scored once per mode: its cache file,
    keyed by everything its figures depend on, is carried into each next scratch workdir.
    Each row also carries the init's CPU-seconds, as config.json records them.
    """
    rows, cache = [], None
    for init in _split(cfg.inits):
        logging.info("[%s] step-0 evaluation of init=%s", mode, init)
        with tempfile.TemporaryDirectory(dir=out) as scratch:
            scratch = pathlib.Path(scratch)
            if cache is not None:
                (scratch / base_cost.CACHE).write_text(cache)
            loop.run(dataclasses.replace(train_config(cfg, mode, init, scratch, max_steps=1), analyze=False))
            event = next(e for e in records.read_metrics(scratch) if e.get("step") == 0 and "val_loss" in e)
            record = records.read_config(scratch)
            cache = (scratch / base_cost.CACHE).read_text()
        rows.append({"model": f"injected, init={init}", "init": init, "eval": {k: v for k, v in event.items()
                     if k.startswith(("val_", "base_", "delta_", "word_"))}, "init_cpu_s": record["init_cost"]["cpu_s"],
                     "vocab": record["vocab"], "data": record["data"]})
    base = rows[0]["eval"]
    rows.insert(0, {"model": "base model, before injection", "init": None, "init_cpu_s": None, "eval": {
        "val_nats_per_char": base["base_nats_per_char"], "delta_nats_per_char": 0.0,
        "val_bits_per_byte": base["base_bits_per_byte"], "val_word_nats_seen": base["base_word_nats_seen"],
        "val_word_nats_unseen": base["base_word_nats_unseen"]}})
    return rows


def init_table_md(rows: list[dict]) -> str:
    """The init table of one mode: one row per model, figures as INIT_COLUMNS orders them, then the init's cost."""
    def cell(value, digits=4):
        return "n/a" if value is None else f"{value:.{digits}f}"

    header = ["model", "nats/char", "Δ nats/char vs base", "bits/byte", "new seen (nats/token)",
              "new unseen (nats/token)", "word seen (nats)", "word unseen (nats)", "all targets (nats/token)", "init CPU-s"]
    return _md_table(header, [[row["model"], *(cell(row["eval"].get(key)) for key in INIT_COLUMNS),
                               cell(row["init_cpu_s"], 1)] for row in rows])


def neighbour_queries(cfg: RealModelConfig, tokenizer, base_size: int) -> list[tuple[str, str, int]]:
    """(segment, word, id) of the chosen words that are new tokens, then lexicon beginning/middle/end."""
    added = vocab.added_words(tokenizer, base_size)
    index = {w: base_size + i for i, w in enumerate(added)}
    queries = [("chosen", w, index[w]) for w in _split(cfg.words) if w in index]
    k, n = cfg.words_per_segment, len(added)
    for segment, start in (("beginning", 0), ("middle", n // 2 - k // 2), ("end", n - k)):
        queries += [(segment, added[i], base_size + i) for i in range(start, start + k)]
    return queries


def neighbours(table: np.ndarray, base_size: int, queries, tokenizer, *, centred: bool = False) -> dict[str, list]:
    """word -> its 5 nearest base tokens [token, cosine]; `centred` first subtracts the base rows' mean.

    The centred view exists because a real table has a large common direction (SmolLM2's base
    rows have mean pairwise cosine 0.44): raw cosines of rows near the mean are dominated by
    it, and every such row then has the same neighbours.
    """
    if centred:
        table = table - table[:base_size].mean(axis=0, dtype=np.float64).astype(np.float32)
    ids, cosines = metrics.nearest_by_cosine(table[[q[2] for q in queries]], table[:base_size], 5)
    names = tokenizer.convert_ids_to_tokens
    return {word: [[names(int(i)), round(float(c), 4)] for i, c in zip(row_ids, row_cos)]
            for (_, word, _), row_ids, row_cos in zip(queries, ids, cosines)}


def continuation(model_cfg, params, tokenizer, cfg: RealModelConfig) -> tuple[str, list[int]]:
    """(text, ids) of the greedy continuation of the prompt."""
    prompt = np.asarray([tokenizer(cfg.prompt, add_special_tokens=False)["input_ids"]])
    out = generate.generate(model_cfg, params, prompt, cfg.max_new_tokens, repetition_penalty=cfg.repetition_penalty)
    ids = [int(i) for i in np.asarray(out)[0, prompt.shape[1]:]]
    return tokenizer.decode(ids), ids


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":--"] + ["--:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def run_mode(cfg: RealModelConfig, mode: str, out: pathlib.Path) -> dict:
    result = {"init_table": init_table(cfg, mode, out)}
    if cfg.max_steps == 0:
        return result
    workdir = out / mode / "phase1"
    logging.info("[%s] Phase 1: %d steps of %d tokens", mode, cfg.max_steps, cfg.seq_len * cfg.batch_size * cfg.grad_accum)
    run = loop.run(train_config(cfg, mode, cfg.init, workdir, cfg.max_steps))
    result["run"] = {"final_step": run.final_step, "last_train_loss": run.last_train_loss, "last_val_loss": run.last_val_loss,
                     "loss_table": (workdir / "loss_table.md").read_text()}
    summary = json.loads((workdir / "analysis" / "summary.json").read_text())
    result["analysis"] = {key: summary[key] for key in ("norms", "isotropy", "pca")}
    result["analysis"]["drift"] = {g: {k: summary["drift"][g][k] for k in ("cosine", "l2")} for g in ("base", "new")}

    logging.info("[%s] neighbours and generations", mode)
    model_cfg, params, _ = runs.load_params(workdir, as_numpy=True)
    tokenizer = vocab.load_base_tokenizer(workdir / "tokenizer")
    base_size = summary["meta"]["base_vocab_size"]
    queries = neighbour_queries(cfg, tokenizer, base_size)
    pre = np.load(workdir / prepare.EMBEDDINGS_PRE)
    result["neighbours"] = {"queries": [list(q) for q in queries],
                            "skipped": [w for w in _split(cfg.words) if w not in {q[1] for q in queries}]}
    for when, table in (("before", pre), ("after", params["embedding"])):
        result["neighbours"][when] = neighbours(table, base_size, queries, tokenizer)
        result["neighbours"][f"{when}, centred"] = neighbours(table, base_size, queries, tokenizer, centred=True)
    base_cfg, base_params = convert.load_hf(cfg.model)
    frozen = {k: v for k, v in params.items() if k != "embedding"}
    continuations = {
        "base model": continuation(base_cfg, base_params, vocab.load_base_tokenizer(cfg.model), cfg),
        f"injected, step 0 (init={cfg.init})": continuation(model_cfg, {**frozen, "embedding": pre}, tokenizer, cfg),
        f"trained, step {run.final_step}": continuation(model_cfg, params, tokenizer, cfg),
    }
    result["generations"] = {who: text for who, (text, _) in continuations.items()}
    result["where_the_loss_goes"] = {
        "validation": {when: {key: value for key, value in event.items() if key.startswith("val_")}
                       for when, event in _first_and_last_eval(workdir).items()},
        "source_rank": {group: {when: section[when] for when in ("pre", "post")}
                        for group, section in summary["source_rank"].items()},
        "new_token_share": {who: generate.new_token_usage(ids, base_size)["share_new"]
                            for who, (_, ids) in continuations.items()},
    }
    return result


def _first_and_last_eval(workdir: pathlib.Path) -> dict[str, dict]:
    evals = [event for event in records.read_metrics(workdir) if "val_loss" in event]
    return {f"step {evals[0]['step']}": evals[0], f"step {evals[-1]['step']}": evals[-1]}


def _loss_cell(fields: dict, suffix: str) -> str:
    loss = fields.get(f"val_loss{suffix}")
    return "n/a" if loss is None else f"{loss:.4f} ({fields[f'val_tokens{suffix}']:,})"


def _rank_cell(summary: dict | None) -> str:
    return "n/a" if summary is None else f"{summary['median_rank']:g} ({summary['share_top50']:.1%})"


def where_the_loss_goes(results: dict) -> str:
    """Issue 21's figures for each mode: validation loss by target type at the first and last
    eval, source ranks before and after, and the share of new tokens in each generation."""
    rows, ranks, shares = [], [], []
    for mode, r in results.items():
        where = r["where_the_loss_goes"]
        rows += [[f"`{mode}`", when, _loss_cell(f, ""), _loss_cell(f, "_new"), _loss_cell(f, "_base"),
                  _loss_cell(f, "_resegmented")] for when, f in where["validation"].items()]
        ranks += [[f"`{mode}`", group, _rank_cell(s["pre"]), _rank_cell(s["post"])]
                  for group, s in where["source_rank"].items()]
        shares += [[f"`{mode}`", who, "n/a" if share is None else f"{share:.1%}"]
                   for who, share in where["new_token_share"].items()]
    return ("Validation loss (nats/token, with the number of predicted tokens) by target type:\n\n"
            + _md_table(["injection", "eval", "all", "new (Wake) targets", "base targets", "re-segmented words"], rows)
            + "\nRank of the English source among each Wake word's nearest base tokens: median (share in the top 50):\n\n"
            + _md_table(["injection", "pairs", "before training", "after training"], ranks)
            + "\nShare of new (Wake) tokens in the greedy continuations:\n\n"
            + _md_table(["injection", "model", "new tokens"], shares))


_NEIGHBOUR_TITLES = {
    "before": "before training", "after": "after training",
    "before, centred": "before training, cosines centred on the base mean",
    "after, centred": "after training, cosines centred on the base mean",
}


def write_reports(cfg: RealModelConfig, out: pathlib.Path, results: dict) -> None:
    init_md, neigh_md, gen_md = [], [], [f"Prompt: `{cfg.prompt}`; greedy, repetition penalty {cfg.repetition_penalty}, "
                                         f"{cfg.max_new_tokens} new tokens.\n"]
    for mode, r in results.items():
        first = r["init_table"][1]["eval"]
        init_md.append(f"Injection `{mode}`: the first {cfg.eval_blocks} validation blocks; step-0 evaluations. Seen / unseen: "
                       f"{first['val_tokens_new_seen']:,} / {first['val_tokens_new_unseen']:,} new-token targets, "
                       f"{first['word_occurrences_seen']:,} / {first['word_occurrences_unseen']:,} Wake-word occurrences "
                       "(a word costs the nats of the tokens that spell it and of the token after it).\n\n"
                       + init_table_md(r["init_table"]))
        if "run" not in r:
            continue
        skipped = ", ".join(f"`{w}`" for w in r["neighbours"]["skipped"]) or "none"
        neigh_md.append(f"Injection `{mode}`. Chosen words that are not new tokens (so not listed): {skipped}.\n")
        for when, title in _NEIGHBOUR_TITLES.items():
            neigh_md.append(f"Injection `{mode}`, {title} (5 nearest base tokens by cosine; Ġ is a leading space):\n\n"
                            + _md_table(["segment", "word", "nearest base tokens (cosine)"], [
                                [seg, f"`{word}`", ", ".join(f"`{t}` {c:.3f}" for t, c in r["neighbours"][when][word])]
                                for seg, word, _ in r["neighbours"]["queries"]]))
        gen_md += [f"## Injection `{mode}`: {who}\n\n```\n{cfg.prompt}{text}\n```\n" for who, text in r["generations"].items()]
        shutil.copy(out / mode / "phase1" / "loss_table.md", out / f"loss_table_{mode}.md")
        shutil.copy(out / mode / "phase1" / "loss_curve.png", out / f"loss_curve_{mode}.png")
        shutil.copy(out / mode / "phase1" / "analysis" / "embedding_analysis.png", out / f"embedding_analysis_{mode}.png")
    (out / "init_table.md").write_text("\n".join(init_md))
    trained = {mode: r for mode, r in results.items() if "run" in r}
    if trained:
        (out / "where_the_loss_goes.md").write_text(where_the_loss_goes(trained))
        (out / "neighbours.md").write_text("\n".join(neigh_md))
        (out / "generations.md").write_text("\n".join(gen_md))
    (out / "results.json").write_text(json.dumps({"settings": dataclasses.asdict(cfg), "results": results},
                                                 indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def run(cfg: RealModelConfig) -> str:
    modes = _split(cfg.injections)
    for mode in modes:  # every mode's settings checked before anything is written
        train_config(cfg, mode, cfg.init, cfg.out, cfg.max_steps)
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {mode: run_mode(cfg, mode, out) for mode in modes}
    write_reports(cfg, out, results)
    return f"done: {out}"


if __name__ == "__main__":
    launcher.launch(RealModelConfig, run, __doc__)
