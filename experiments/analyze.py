r"""Runs the embedding analysis: writes summary.json and embedding_analysis.png.

From a training workdir (the table of its latest or a given checkpoint step, its
embeddings_pre.npy, its tokenizer and the base vocabulary size from its config.json):

    python -m experiments.analyze --workdir=W [--step=N]        # -> W/analysis/, W/tensorboard/ (projector)

From tables anywhere (.npy, rows x dims; --pre and --tokenizer optional):

    python -m experiments.analyze --post=a.npy --pre=b.npy --base_vocab_size=32000 \
        --tokenizer=DIR [--out_dir=DIR]                        # default: beside a.npy, in analysis/

With token names, the summary's source_rank section ranks each Wake coinage's English
source among its nearest base tokens (built-in and edit-distance pairs, plus --pairs=FILE
of 'WAKE ENGLISH' lines), and the launcher logs those figures and, with --workdir, the
new-token usage of W/generations.json.

Bad inputs (a missing or unreadable file, pre and post of different shapes,
base_vocab_size that leaves no new rows, an output directory that cannot be written) are
one line saying what to fix, and the process exits 1.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import ClassVar

import numpy as np

from wake2vec import launcher
from wake2vec.training import workdir as records
from wake2vec.config import FlagError
from wake2vec.errors import UserError


class AnalysisInputError(UserError, ValueError):
    """A table, tokenizer or workdir the analysis was pointed at is unusable."""


class MissingInputError(UserError, FileNotFoundError):
    """A file the analysis needs does not exist."""


@dataclasses.dataclass(frozen=True)
class AnalyzeConfig:
    """Flags of experiments.analyze: a workdir, or tables given as files."""

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("workdir", "post", "pre", "tokenizer", "out_dir", "pairs")

    # Training workdir to analyse; writes WORKDIR/analysis/.
    workdir: str = ""
    # Checkpoint step to analyse (with --workdir); default the latest.
    step: int | None = None
    # Trained table as .npy (rows x dims), instead of --workdir.
    post: str = ""
    # Pre-training table as .npy, same shape as --post; enables drift.
    pre: str = ""
    # With --post: rows [:N] are the base vocabulary.
    base_vocab_size: int | None = None
    # With --post: tokenizer directory, for token names.
    tokenizer: str = ""
    # Output directory; default WORKDIR/analysis or <dir of --post>/analysis.
    out_dir: str = ""
    # Seed of every subsample; fixes the summary.
    seed: int = 0
    # File of 'WAKE ENGLISH' lines: ranked as the user group of source_rank.
    pairs: str = ""


def load_table(path) -> np.ndarray:
    """A 2-D float table from a .npy file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingInputError(f"no table at {path}: pass the path of a .npy file holding a (rows x dims) array")
    try:
        table = np.load(path)
    except (OSError, ValueError, EOFError) as e:
        raise AnalysisInputError(f"{path} is not a readable .npy file ({e}); pass a table saved with numpy.save") from None
    if not isinstance(table, np.ndarray) or table.ndim != 2 or not np.issubdtype(table.dtype, np.floating):
        raise AnalysisInputError(f"{path} holds a {getattr(table, 'dtype', type(table))} array of shape "
                                 f"{getattr(table, 'shape', '?')}; expected 2-D float (rows x dims)")
    return table


def load_id_to_token(tokenizer_dir, n_rows: int) -> list[str | None]:
    """Token string of each of n_rows ids (added tokens included), None past the tokenizer's vocabulary."""
    tokenizer_dir = pathlib.Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise MissingInputError(f"no tokenizer directory at {tokenizer_dir}: pass a save_pretrained() directory")
    from transformers import AutoTokenizer  # heavy import, only when names are asked for

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as e:
        raise AnalysisInputError(f"cannot load a tokenizer from {tokenizer_dir} ({e})") from None
    known = min(len(tokenizer), n_rows)
    return list(tokenizer.convert_ids_to_tokens(list(range(known)))) + [None] * (n_rows - known)


def _check_base_size(base_vocab_size: int, rows: int) -> None:
    if not 0 < base_vocab_size < rows:
        raise AnalysisInputError(f"--base_vocab_size={base_vocab_size} must leave new rows: the table has {rows}, "
                                 "so pass a size in [1, rows)")


def analyze_files(post_path, base_vocab_size: int, out_dir=None, *, pre_path=None, tokenizer_dir=None,
                  seed: int = 0, pairs_file=None) -> dict:
    """Analysis of .npy tables from anywhere; returns the summary written to out_dir."""
    from wake2vec.analysis import report

    E_post = load_table(post_path)
    _check_base_size(base_vocab_size, E_post.shape[0])
    E_pre = load_table(pre_path) if pre_path is not None else None
    if E_pre is not None and E_pre.shape != E_post.shape:
        raise AnalysisInputError(f"--pre {pre_path} has shape {E_pre.shape} but --post {post_path} has {E_post.shape}; "
                                 "they must be the same table before and after training")
    tokens = load_id_to_token(tokenizer_dir, E_post.shape[0]) if tokenizer_dir is not None else None
    out_dir = records.writable_dir(pathlib.Path(out_dir) if out_dir is not None else pathlib.Path(post_path).parent / "analysis",
                                   "--out_dir")
    source = {"post": str(post_path), "pre": None if pre_path is None else str(pre_path)}
    return report.run_analysis(E_post, base_vocab_size, out_dir, E_pre=E_pre, tokens=tokens, seed=seed, source=source,
                               pairs_file=pairs_file)


def phase1_training_counts(workdir: pathlib.Path, config: dict, n_rows: int) -> np.ndarray | None:
    """Each row's occurrences in the Phase 1 training blocks (which Phase 2 and 3 train on too),
    rebuilt from the Phase 1 workdir's corpus token cache and its split flags; None without a
    cache that matches config.json's corpus_tokens_sha256 (the seen/unseen split is then left out)."""
    phase1 = pathlib.Path(config["phase1"]["workdir"]) if "phase1" in config else workdir
    phase1_config = config if phase1 == workdir else records.read_config(phase1)
    expected = (phase1_config or {}).get("corpus_tokens_sha256")
    for path in sorted(phase1.glob("corpus_tokens_*.npy")) if expected is not None else []:
        ids = np.load(path)
        if records.array_sha256(ids) == expected:
            from wake2vec.training import data, train

            flags = phase1_config["flags"]
            blocks = data.split_ids(ids, flags["seq_len"], flags["val_fraction"], flags["split_shuffle_seed"])[0]
            return train.training_counts(blocks, n_rows)
    logging.warning("no corpus token cache in %s matches its config.json: new rows are not split by training exposure", phase1)
    return None


def analyze_workdir(workdir, *, step: int | None = None, out_dir=None, seed: int = 0, pairs_file=None) -> dict:
    """Analysis of a training workdir's checkpoint (the latest, or `step`)."""
    from wake2vec.analysis import report

    workdir = pathlib.Path(workdir)
    config = records.read_config(workdir)
    if config is None:
        raise MissingInputError(f"{workdir / records.CONFIG} not found: is {workdir} a wake2vec training workdir?")
    try:
        base_vocab_size = int(config["vocab"]["base_size"])
    except (KeyError, TypeError, ValueError):
        raise AnalysisInputError(f"{workdir / records.CONFIG} has no vocab.base_size; use --post/--pre/--base_vocab_size "
                                 "instead") from None
    out_dir = records.writable_dir(pathlib.Path(out_dir) if out_dir is not None else workdir / "analysis", "--out_dir")
    from wake2vec.phases import runs  # pulls in JAX and Orbax; only this mode needs them

    # A Phase 2 run's table is its Phase 1 table: load_table says so, before anything else is read.
    E_post, loaded_step = runs.load_table(workdir, step=step)  # padding rows already cut
    if config.get("phase") == 3:  # its table before training is the Phase 1 table it started from
        E_pre, _ = runs.load_table(config["phase1"]["workdir"], int(config["phase1"]["step"]))
    else:
        E_pre = records.verified_npy(workdir / "embeddings_pre.npy", config.get("embeddings_pre_sha256"),
                                     "rerun the training command on this workdir to rewrite it, or analyse without drift "
                                     "(export the table and use --post without --pre)")
    if E_pre.shape != E_post.shape:
        raise AnalysisInputError(f"{workdir / 'embeddings_pre.npy'} has shape {E_pre.shape} but the step-{loaded_step} "
                                 f"table has {E_post.shape}")
    tokens = None
    if (workdir / records.TOKENIZER_DIR).is_dir():
        tokens = load_id_to_token(records.verified_tokenizer_dir(workdir, config), E_post.shape[0])
    else:
        logging.warning("%s not found: token names will be null", workdir / records.TOKENIZER_DIR)
    source = {"workdir": str(workdir), "step": int(loaded_step)}
    summary = report.run_analysis(E_post, base_vocab_size, out_dir, E_pre=E_pre, tokens=tokens, seed=seed, source=source,
                                  pairs_file=pairs_file, train_counts=phase1_training_counts(workdir, config, E_post.shape[0]))
    from wake2vec.training import tboard

    tboard.write_projector(workdir / tboard.LOGDIR, E_post, base_vocab_size, tokens or [None] * E_post.shape[0],
                           name=f"trained table, step {loaded_step}")
    return summary


def run(cfg: AnalyzeConfig) -> str:
    if bool(cfg.workdir) == bool(cfg.post):
        raise FlagError("give exactly one of --workdir or --post")
    if cfg.seed < 0:
        raise FlagError(f"--seed={cfg.seed} must be >= 0")
    if cfg.workdir:
        summary = analyze_workdir(cfg.workdir, step=cfg.step, out_dir=cfg.out_dir or None, seed=cfg.seed,
                                  pairs_file=cfg.pairs or None)
    else:
        if cfg.base_vocab_size is None:
            raise FlagError("--post needs --base_vocab_size (rows [:N] are the base vocabulary)")
        summary = analyze_files(cfg.post, cfg.base_vocab_size, cfg.out_dir or None, pre_path=cfg.pre or None,
                                tokenizer_dir=cfg.tokenizer or None, seed=cfg.seed, pairs_file=cfg.pairs or None)
    from wake2vec.analysis import source_rank, usage

    logging.info("%s", source_rank.headline(summary))
    if cfg.workdir:
        logging.info("%s", usage.generation_usage_headline(cfg.workdir))
    return f"analysis written: {summary['meta']['source']}"


if __name__ == "__main__":
    launcher.launch(AnalyzeConfig, run, __doc__)
