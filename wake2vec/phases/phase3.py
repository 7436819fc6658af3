"""Phase 3: the Phase 2 adapters and the Wake rows, under the LM loss plus the alignment terms.

The study's third phase meant to make the Wake's morphology visible in the embedding
space: it trained its Phase 2 adapters together with the Wake rows under
L_lm + lambda_m L_morph + lambda_d L_device + 0.05 L_rep + 0.01 L_norm (wake2vec.phases.alignment).
What this module does about its defects:

* **Validation is the LM loss alone.** The extra terms are a regulariser of the step
  (wake2vec.training.train.make_train_step), not part of the evaluated loss; each term is logged on
  its own, so the study's reported "LM regression" of +0.42, which was those terms, cannot
  happen here.
* **The words are read as running text reads them**, with their word-start marker
  (wake2vec.phases.groups.running_text_pieces), so the terms act on the rows the model uses.
* **Base rows are exactly fixed**: their gradient and their update are masked (weight decay
  included); the report checks them bit for bit. The Wake rows get their own learning rate
  (--wake_lr, Phase 1's by default; the study's was 10x below it).
* **Early stopping survives a resume** (its count is read back from metrics.jsonl).
* **Phase 1's blocks**, rebuilt and hash-checked as in Phase 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib

import jax
import numpy as np

from wake2vec.phases import alignment, runs, groups, phase2, prepare
from wake2vec.training import checkpoint, hosts, optim, train
from wake2vec.models import convert, lora
from wake2vec.tokens import vocab
from wake2vec.training import workdir as records
from wake2vec.config import DEMO_SOURCE, FlagError, Phase3Config

BUILT_GROUPS = "morpheme_groups.jsonl"
DEMO_PRESET = dict(phase2.DEMO_PRESET, max_steps=100, wake_lr=1e-2, lambda_device=0.0)


def validate_flags(cfg: Phase3Config) -> None:
    prepare.validate_run_flags(cfg)
    phase2.check_previous_workdir(cfg, "phase2", cfg.phase2, "python -m experiments.train_p2")
    phase2.check_step_choice(cfg.phase2_step, "phase2_step")
    if cfg.lambda_device > 0 and not cfg.device_groups:
        raise FlagError(f"--lambda_device={cfg.lambda_device} needs --device_groups (a JSONL file, docs/groups.md); "
                        "pass --lambda_device=0 to train without the device term")
    for name in ("morpheme_groups", "device_groups"):
        path = getattr(cfg, name)
        if path and not pathlib.Path(path).is_file():
            raise FlagError(f"--{name}={path}: no such file")


def demo_preset(cfg: Phase3Config, explicitly_set: set[str]) -> Phase3Config:
    """The demo's Phase 3 schedule for every flag not set, when --phase2 comes from the demo."""
    return phase2.preset_after(cfg, cfg.phase2, DEMO_PRESET, explicitly_set)


def _tree_sha256(tree) -> str:
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return digest.hexdigest()


def _groups_sha256(morph, devices) -> str:
    """The identity of the groups a run trains with, read or built: a changed file or a
    changed builder is refused on resume like any other changed source."""
    canonical = json.dumps([[g.as_dict() for g in morph], [dataclasses.asdict(g) for g in devices]], sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _morpheme_groups(cfg: Phase3Config, inputs: phase2.Phase1Inputs, workdir: pathlib.Path):
    """(groups, where they came from, the builder's counts or None): the groups file's, or
    affix groups built from the lexicon and the base vocabulary (written to
    workdir/morpheme_groups.jsonl, so the run's inputs are on disk)."""
    if cfg.morpheme_groups:
        return groups.read_morpheme_groups(cfg.morpheme_groups, min_pairs=cfg.min_group_pairs), cfg.morpheme_groups, None
    words = vocab.load_lexicon(inputs.record["lexicon"])
    base_tokenizer = vocab.load_base_tokenizer(inputs.record["tokenizer_source"])
    built = groups.build_affix_groups(words, groups.base_whole_words(base_tokenizer), min_pairs=cfg.min_group_pairs)
    path = workdir / BUILT_GROUPS
    groups.write_groups(path, built)
    counts = groups.affix_counts(words, built)
    logging.info("built %d affix groups (%d pairs) from the lexicon -> %s", len(built), sum(g.n_examples for g in built), path)
    return built, str(path), counts


def prepare_phase3(cfg: Phase3Config):
    """The Phase 3 job: adapters and table trainable (base rows masked), body frozen."""
    from wake2vec.training import loop

    workdir = pathlib.Path(cfg.workdir)
    stored = records.read_config(workdir)
    hosts.barrier("config read")
    workdir.mkdir(parents=True, exist_ok=True)
    p2_dir = pathlib.Path(cfg.phase2)
    p2 = runs.run_record(p2_dir)
    if p2.get("phase") != 2:
        raise phase2.PhaseInputError(f"--phase2={p2_dir} is not a Phase 2 run (its config.json says phase {p2.get('phase', 1)})")
    phase1 = pathlib.Path(p2["phase1"]["workdir"])
    inputs = phase2.phase1_inputs(phase1, workdir)
    total, tied = int(p2["vocab"]["total"]), runs.is_tied(p2)
    base_size = int(p2["vocab"]["base_size"])
    tables = runs.recorded_phase1_tables(p2)
    step = (stored or {}).get("phase2", {}).get("step")
    if step is None or stored.get("flags", {}).get("phase2_step") != cfg.phase2_step:
        step = phase2.resolve_step(p2_dir, cfg.phase2_step, "phase2_step")
    adapters = checkpoint.load_trainable(p2_dir, step)[0]["lora"]
    morph, morph_source, built_counts = _morpheme_groups(cfg, inputs, workdir)
    devices = groups.read_device_groups(cfg.device_groups) if cfg.device_groups else []
    # The norm band is the base rows' at the start; they never move, so it is theirs throughout.
    band = tuple(float(x) for x in alignment.norm_band(tables["embedding"], base_size))
    data, group_stats = groups.alignment_data(inputs.tokenizer, morph, devices, base_size, band=band)
    data_on_device = jax.device_put(data)  # the step indexes it with traced samples
    hashes = {**inputs.hashes, "phase1_table_sha256": p2["phase1_table_sha256"], "phase2_adapters_sha256": _tree_sha256(adapters),
              "groups_sha256": _groups_sha256(morph, devices)}
    history = prepare.check_against_stored(stored, cfg, hashes, workdir) if stored else []
    spec = lora.LoraSpec(tuple(p2["lora"]["targets"]), p2["lora"]["rank"], p2["lora"]["alpha"], p2["lora"]["dropout"])
    model_cfg = convert.read_config(inputs.model_dir).replace(vocab_size=total, tie_word_embeddings=tied)
    weights = alignment.AlignmentWeights(morph=cfg.lambda_morph, device=cfg.lambda_device, rep=cfg.lambda_rep, norm=cfg.lambda_norm)
    record = {
        **(stored or {}),
        "phase": 3,
        "flags": dataclasses.asdict(cfg),
        "command": records.command_line(),
        "versions": records.library_versions(),
        "phase2": {"workdir": str(p2_dir.resolve()), "step": step},
        "phase1": p2["phase1"],
        "model_spec": p2.get("model_spec"),
        "model_source": p2["model_source"],
        "tokenizer_source": p2["tokenizer_source"],
        "tokenizer_sha256": hosts.writer_only(prepare.save_tokenizer)(inputs.tokenizer, workdir),
        **hashes,
        "model": dataclasses.asdict(model_cfg),
        "vocab": p2["vocab"],
        "data": p2["data"],
        "lora": p2["lora"],
        "groups": {"morpheme_groups": morph_source, "device_groups": cfg.device_groups or None, "built": built_counts,
                   "norm_band": band, **group_stats},
        "config_changes": history,
        **optim.schedule_record(stored, cfg),
    }
    records.write_config(workdir, record)
    logging.info("Phase 3 from %s step %d: groups %s", p2_dir, step, json.dumps(group_stats))
    if cfg.max_steps == 0:
        return None
    frozen = prepare.read_frozen_body(inputs.model_dir, cfg.frozen_dtype)
    trainable = {"lora": adapters, "embedding": tables.pop("embedding")}
    frozen.update(tables)  # an untied head stays as Phase 1 left it
    settings = train.settings_for(cfg, model_cfg, seed=cfg.seed, lora=spec)
    table_start = np.array(trainable["embedding"])

    def regularizer(trainable_now, frozen_now, key):
        del frozen_now
        return alignment.alignment_terms(trainable_now["embedding"], data_on_device, weights, key)

    job = loop.Job(cfg, model_cfg, trainable, frozen, base_size, inputs.train_blocks, inputs.val_blocks, inputs.val_resegmented,
                   record, settings, lr_by_key={"embedding": cfg.wake_lr}, regularizer=regularizer,
                   curve_title="Phase 3: adapters and Wake rows, LM loss (the alignment terms apart)")

    def finish(state: train.TrainState, frozen_now: dict) -> None:
        from wake2vec.analysis import phases

        if cfg.analyze:
            phases.write_phase3_report(workdir, state, table_start, record, spec, data, inputs.tokenizer,
                                       train_counts=train.training_counts(inputs.train_blocks, model_cfg.vocab_size))
        if cfg.generate_at_end:
            loop.generate_at_end(cfg, model_cfg, {**frozen_now, **state.trainable}, inputs.tokenizer, int(state.step),
                                 demo=p2.get("model_spec") == DEMO_SOURCE, base_size=base_size, lora_spec=spec)

    job.finish = finish
    return job


def run(cfg: Phase3Config):
    from wake2vec.training import loop

    return loop.run_phase(cfg, validate_flags, prepare_phase3)
