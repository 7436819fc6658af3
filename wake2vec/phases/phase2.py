"""Phase 2: LoRA adapters on the frozen body, over the frozen table of a Phase 1 run.

The study's Phase 2 froze the table Phase 1 trained and adapted the transformer with LoRA
so that the body learns to use the new words. What this module adds to its recipe:

* **The same split.** The study drew a new random 90/10 split for Phase 2, so most of its
  validation blocks had been Phase 1 training text. Here the blocks are rebuilt from the
  Phase 1 run's own flags and sources (`prepare.corpus_split`), every source checked
  against the hashes that run recorded, so Phase 2 trains and validates on exactly
  Phase 1's blocks.
* **The table is frozen by construction.** It is a non-differentiated argument of the step
  (wake2vec.training.train), like the body; only the adapters and their optimiser state are in a
  checkpoint. The analysis checks the table bit for bit against the Phase 1 checkpoint it
  came from instead of computing a "drift" that is zero by definition.
* **The loss is the language-model loss alone, never scaled by accumulation** (the study
  logged its Phase 2 train loss inflated by the accumulation factor on some runs).

`phase1_inputs` is what every later phase reads from a Phase 1 run; Phase 3 reaches it
through its Phase 2 run.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import jax
import numpy as np

from wake2vec.training import checkpoint, data, hosts, optim, train, workdir as records
from wake2vec.phases import runs, prepare
from wake2vec.models import convert, lora
from wake2vec.tokens import vocab
from wake2vec.config import DEMO_SOURCE, FlagError, Phase2Config, TrainConfig
from wake2vec.errors import UserError

# The demo's Phase 2 schedule (a Phase 1 demo run as --phase1), for every flag not set.
DEMO_PRESET = dict(
    batch_size=2, grad_accum=2, max_steps=200, lr=1e-3, eval_every=50, save_every=100, log_every=25, keep=2,
    generate_at_end=True, frozen_dtype="float32", compute_dtype="float32",
)
STEP_CHOICES = ("best", "latest")


class PhaseInputError(UserError, ValueError):
    """The earlier phase's workdir this run starts from is missing, unfinished or changed."""


def lora_spec(cfg: Phase2Config) -> lora.LoraSpec:
    return lora.LoraSpec(lora.parse_targets(cfg.lora_targets), cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)


def check_step_choice(value: str, flag: str) -> None:
    """--<flag> names an earlier phase's checkpoint: best, latest or a step number."""
    if value not in STEP_CHOICES and not value.isdigit():
        raise FlagError(f"--{flag}={value!r}; choose best, latest or a step number")


def check_previous_workdir(cfg, flag: str, previous: str, command: str) -> None:
    """--workdir must differ from the earlier phase's workdir, which must hold a run."""
    if not previous.strip():
        raise FlagError(f"--{flag} is empty; pass the workdir of the run to start from")
    here, there = pathlib.Path(cfg.workdir).resolve(), pathlib.Path(previous).resolve()
    if here == there:
        raise FlagError(f"--workdir and --{flag} are both {here}: each phase writes its own workdir; choose another --workdir")
    if not there.is_dir():
        raise PhaseInputError(f"--{flag}={previous}: no such directory; train it first ({command} --workdir={previous})")
    if not (there / records.CONFIG).is_file():
        raise PhaseInputError(f"--{flag}={previous}: no {records.CONFIG} there; train it first ({command} --workdir={previous})")
    # --phase1 names a Phase 1 run, --phase2 a Phase 2 run: another phase's record lacks what this one reads.
    wanted = int(flag.removeprefix("phase"))
    found = (records.read_config(there) or {}).get("phase", 1)
    if found != wanted:
        raise PhaseInputError(f"--{flag}={previous} is a Phase {found} run; pass the workdir of a Phase {wanted} run "
                              f"({command})")


def validate_flags(cfg: Phase2Config) -> None:
    prepare.validate_run_flags(cfg)
    lora.parse_targets(cfg.lora_targets)
    check_step_choice(cfg.phase1_step, "phase1_step")
    if cfg.snapshot_every:
        raise FlagError("--snapshot_every: Phase 2 trains no table rows, so there is nothing to snapshot; leave it 0")
    check_previous_workdir(cfg, "phase1", cfg.phase1, "python -m experiments.train_p1")


def preset_after(cfg, previous: str, preset: dict, explicitly_set: set[str]):
    """`cfg` with `preset` for every flag not set, when the earlier phase's run `previous`
    comes from the embedded demo (its record's model_spec); otherwise `cfg` as it is."""
    stored = records.read_config(pathlib.Path(previous)) if pathlib.Path(previous).is_dir() else None
    if not stored or stored.get("model_spec") != DEMO_SOURCE:
        return cfg
    return dataclasses.replace(cfg, **{k: v for k, v in preset.items() if k not in explicitly_set})


def demo_preset(cfg: Phase2Config, explicitly_set: set[str]) -> Phase2Config:
    """The demo's Phase 2 schedule for every flag not set, when --phase1 is a demo run."""
    return preset_after(cfg, cfg.phase1, DEMO_PRESET, explicitly_set)


def resolve_step(run_dir: pathlib.Path, choice: str, flag: str) -> int:
    """The committed step of an earlier phase's run that --<flag> names: best (the lowest
    validation loss; the latest, with a warning, if none recorded one), latest, or a number."""
    steps = checkpoint.committed_steps(run_dir)
    if not steps:
        raise PhaseInputError(f"{run_dir} holds no committed checkpoint; train that phase first (or let it reach a save)")
    if choice == "latest":
        return steps[-1]
    if choice == "best":
        best = checkpoint.best_step(run_dir)
        if best is None:
            logging.warning("no checkpoint in %s recorded a validation loss; using the latest, step %d", run_dir, steps[-1])
            return steps[-1]
        return best
    if int(choice) not in steps:
        raise PhaseInputError(f"--{flag}={choice}: {run_dir} has committed checkpoints {steps} only")
    return int(choice)


@dataclasses.dataclass
class Phase1Inputs:
    """What a later phase takes from a Phase 1 run, every part checked against its record."""

    record: dict
    flags: TrainConfig
    model_dir: pathlib.Path
    tokenizer: object
    vocab_stats: dict  # the Phase 1 record's "vocab"
    train_blocks: np.ndarray
    val_blocks: np.ndarray
    val_resegmented: np.ndarray
    hashes: dict[str, str]  # the Phase 1 sources' hashes as they are now (equal to the recorded ones)


def _phase1_flags(record: dict) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in record["flags"].items() if k in known})


def phase1_inputs(phase1: pathlib.Path, cache_dir: pathlib.Path) -> Phase1Inputs:
    """Phase 1's tokenizer, model source and exact train/validation blocks.

    The blocks are rebuilt from the run's flags and sources (nothing is copied out of the
    Phase 1 workdir, and nothing is written into it): the model, corpus and lexicon must
    still hash as that run recorded, and the corpus must tokenize to the ids it recorded,
    so the split is Phase 1's own. Derived files go to `cache_dir` (this phase's workdir).
    """
    record = runs.run_record(phase1)
    flags = _phase1_flags(record)
    model_dir = pathlib.Path(record["model_source"])
    corpus, lexicon = pathlib.Path(record["corpus"]), pathlib.Path(record["lexicon"])
    for path, what in ((model_dir, "model source"), (corpus, "corpus"), (lexicon, "lexicon")):
        if not path.exists():
            raise PhaseInputError(f"the Phase 1 run's {what} {path} (in {phase1 / records.CONFIG}) is missing; restore it there")
    hashes = prepare.source_hashes(cache_dir, model_dir, corpus, lexicon)
    for name, digest in hashes.items():
        if record.get(name) and record[name] != digest:
            raise prepare.SourceChangedError(
                f"the Phase 1 run's {name.replace('_hash', '')} changed since it trained ({record[name][:16]}... -> "
                f"{digest[:16]}...); its table belongs to the old one: restore it")
    tokenizer = vocab.load_base_tokenizer(records.verified_tokenizer_dir(phase1, record))
    base_tokenizer = vocab.load_base_tokenizer(record["tokenizer_source"])
    words = vocab.load_lexicon(lexicon)
    text = data.read_corpus(corpus, strip_banners=flags.strip_banners, start_marker=flags.start_marker)
    base_size = int(record["vocab"]["base_size"])
    _, train_blocks, val_blocks, val_resegmented, _ = prepare.corpus_split(
        flags, base_tokenizer, tokenizer, words, text, base_size, cache_dir, record.get("corpus_tokens_sha256"))
    return Phase1Inputs(record, flags, model_dir, tokenizer, record["vocab"], train_blocks, val_blocks, val_resegmented, hashes)


def check_adapters_unchanged(stored: dict | None, spec: lora.LoraSpec, workdir: pathlib.Path) -> None:
    """A run with committed checkpoints keeps its adapters' shapes: no checkpoint of rank 8
    restores as rank 4, so such a change is refused before anything is recorded, even with
    --allow_config_change (which lets a run go on under other settings, not other shapes)."""
    before = (stored or {}).get("lora")
    if not before or not checkpoint.committed_steps(workdir):
        return
    was = (tuple(before["targets"]), int(before["rank"]))
    if was != (spec.targets, spec.rank):
        raise records.ConfigMismatchError(
            f"{workdir} holds adapters of rank {was[1]} on {','.join(was[0])}; --lora_rank={spec.rank} "
            f"--lora_targets={','.join(spec.targets)} would change their shapes, which no checkpoint there can be "
            "restored into: keep the run's rank and targets, or use a fresh --workdir")


def prepare_phase2(cfg: Phase2Config):
    """The Phase 2 job: adapters trainable; body, table and head frozen; Phase 1's blocks."""
    from wake2vec.training import loop

    workdir = pathlib.Path(cfg.workdir)
    stored = records.read_config(workdir)
    hosts.barrier("config read")
    workdir.mkdir(parents=True, exist_ok=True)
    phase1 = pathlib.Path(cfg.phase1)
    inputs = phase1_inputs(phase1, workdir)
    p1 = inputs.record
    # A resumed run adapts the table it started with, even if "best" would now name another step.
    step = (stored or {}).get("phase1", {}).get("step")
    if step is None or stored.get("flags", {}).get("phase1_step") != cfg.phase1_step:
        step = resolve_step(phase1, cfg.phase1_step, "phase1_step")
    total, tied = int(p1["vocab"]["total"]), runs.is_tied(p1)
    tables = runs.phase1_tables(phase1, step, total, tied)
    hashes = {**inputs.hashes, "phase1_table_sha256": runs.table_sha256(tables)}
    history = prepare.check_against_stored(stored, cfg, hashes, workdir) if stored else []
    schedule = optim.schedule_record(stored, cfg)
    model_cfg = convert.read_config(inputs.model_dir).replace(vocab_size=total, tie_word_embeddings=tied)
    spec = lora_spec(cfg)
    lora.check_rank(model_cfg, spec)
    check_adapters_unchanged(stored, spec, workdir)
    record = {
        **(stored or {}),
        "phase": 2,
        "flags": dataclasses.asdict(cfg),
        "command": records.command_line(),
        "versions": records.library_versions(),
        "phase1": {"workdir": str(phase1.resolve()), "step": step, "model_spec": p1.get("model_spec")},
        "model_spec": p1.get("model_spec"),
        "model_source": p1["model_source"],
        "tokenizer_source": p1["tokenizer_source"],
        # The Phase 1 tokenizer beside this run's checkpoints, so generate and export read it here.
        "tokenizer_sha256": hosts.writer_only(prepare.save_tokenizer)(inputs.tokenizer, workdir),
        **hashes,
        "model": dataclasses.asdict(model_cfg),
        "vocab": inputs.vocab_stats,
        "data": {"train_blocks": len(inputs.train_blocks), "val_blocks": len(inputs.val_blocks),
                 "seq_len": inputs.flags.seq_len, "split": "Phase 1's (rebuilt from its flags and sources)"},
        "lora": dataclasses.asdict(spec),
        "config_changes": history,
        **schedule,
    }
    records.write_config(workdir, record)
    logging.info("Phase 2 from %s step %d: %d train / %d validation blocks of %d tokens; adapters %s",
                 phase1, step, len(inputs.train_blocks), len(inputs.val_blocks), inputs.flags.seq_len, spec)
    if cfg.max_steps == 0:
        return None
    frozen = prepare.read_frozen_body(inputs.model_dir, cfg.frozen_dtype)
    frozen.update(tables)
    adapters = lora.init_adapters(model_cfg, spec, jax.random.PRNGKey(cfg.seed))
    settings = train.settings_for(cfg, model_cfg, seed=cfg.seed, lora=spec)
    base_size = int(inputs.vocab_stats["base_size"])
    job = loop.Job(cfg, model_cfg, {"lora": adapters}, frozen, base_size, inputs.train_blocks, inputs.val_blocks,
                   inputs.val_resegmented, record, settings, curve_title="Phase 2: LoRA over the frozen Phase 1 table")

    def finish(state: train.TrainState, frozen_now: dict) -> None:
        from wake2vec.analysis import phases

        if cfg.analyze:
            phases.write_phase2_report(workdir, state, frozen_now, record, spec)
        if cfg.generate_at_end:
            loop.generate_at_end(cfg, model_cfg, {**frozen_now, **state.trainable}, inputs.tokenizer, int(state.step),
                                 demo=p1.get("model_spec") == DEMO_SOURCE, base_size=base_size, lora_spec=spec)

    job.finish = finish
    return job


def run(cfg: Phase2Config):
    from wake2vec.training import loop

    return loop.run_phase(cfg, validate_flags, prepare_phase2)
