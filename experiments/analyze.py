"""Runs the embedding analysis: writes summary.json and embedding_analysis.png.

From a training workdir (the table of its latest or a given checkpoint step, its
embeddings_pre.npy, its tokenizer and the base vocabulary size from its config.json):

    python -m experiments.analyze --workdir=W [--step=N]        # -> W/analysis/

From tables anywhere (.npy, rows x dims; --pre and --tokenizer optional):

    python -m experiments.analyze --post=a.npy --pre=b.npy --base_vocab_size=32000 \
        --tokenizer=DIR [--out_dir=DIR]                        # default: beside a.npy, in analysis/

With token names, the summary's source_rank section ranks each Wake coinage's English
source among its nearest base tokens (built-in and edit-distance pairs, plus --pairs=FILE
of 'WAKE ENGLISH' lines), and the launcher logs those figures and, with --workdir, the
new-token usage of W/generations.json.

Bad inputs (a missing file, pre and post of different shapes, base_vocab_size that leaves
no new rows) raise an exception that says what to fix, and the process exits non-zero.
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

import numpy as np
from absl import app, flags, logging

from wake2vec.analysis import report, source_rank


def define_flags() -> None:
    """Defines this launcher's flags; called only when it runs, so importing it for its
    functions (tests, other launchers) never collides with another launcher's flags."""
    flags.DEFINE_string("workdir", None, "Training workdir to analyse; writes WORKDIR/analysis/.")
    flags.DEFINE_integer("step", None, "Checkpoint step to analyse (with --workdir); default the latest.")
    flags.DEFINE_string("post", None, "Trained table as .npy (rows x dims), instead of --workdir.")
    flags.DEFINE_string("pre", None, "Pre-training table as .npy, same shape as --post; enables drift.")
    flags.DEFINE_integer("base_vocab_size", None, "With --post: rows [:N] are the base vocabulary.")
    flags.DEFINE_string("tokenizer", None, "With --post: tokenizer directory, for token names.")
    flags.DEFINE_string("out_dir", None, "Output directory; default WORKDIR/analysis or <dir of --post>/analysis.")
    flags.DEFINE_integer("seed", 0, "Seed of every subsample; fixes the summary.")
    flags.DEFINE_string("pairs", None, "File of 'WAKE ENGLISH' lines: ranked as the user group of source_rank.")


FLAGS = flags.FLAGS


def load_table(path) -> np.ndarray:
    """A 2-D float table from a .npy file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no table at {path}: pass the path of a .npy file holding a (rows x dims) array")
    table = np.load(path)
    if table.ndim != 2 or not np.issubdtype(table.dtype, np.floating):
        raise ValueError(f"{path} holds a {table.dtype} array of shape {table.shape}; expected 2-D float (rows x dims)")
    return table


def load_id_to_token(tokenizer_dir, n_rows: int) -> list[str | None]:
    """Token string of each of n_rows ids (added tokens included), None past the tokenizer's vocabulary."""
    tokenizer_dir = pathlib.Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"no tokenizer directory at {tokenizer_dir}: pass a save_pretrained() directory")
    from transformers import AutoTokenizer  # heavy import, only when names are asked for

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    known = min(len(tokenizer), n_rows)
    return list(tokenizer.convert_ids_to_tokens(list(range(known)))) + [None] * (n_rows - known)


def analyze_files(post_path, base_vocab_size: int, out_dir=None, *, pre_path=None, tokenizer_dir=None,
                  seed: int = 0, pairs_file=None) -> dict:
    """Analysis of .npy tables from anywhere; returns the summary written to out_dir."""
    E_post = load_table(post_path)
    E_pre = load_table(pre_path) if pre_path is not None else None
    if E_pre is not None and E_pre.shape != E_post.shape:
        raise ValueError(f"--pre {pre_path} has shape {E_pre.shape} but --post {post_path} has {E_post.shape}; "
                         "they must be the same table before and after training")
    tokens = load_id_to_token(tokenizer_dir, E_post.shape[0]) if tokenizer_dir is not None else None
    out_dir = pathlib.Path(out_dir) if out_dir is not None else pathlib.Path(post_path).parent / "analysis"
    source = {"post": str(post_path), "pre": None if pre_path is None else str(pre_path)}
    return report.run_analysis(E_post, base_vocab_size, out_dir, E_pre=E_pre, tokens=tokens, seed=seed, source=source,
                               pairs_file=pairs_file)


def analyze_workdir(workdir, *, step: int | None = None, out_dir=None, seed: int = 0, pairs_file=None) -> dict:
    """Analysis of a training workdir's checkpoint (the latest, or `step`)."""
    workdir = pathlib.Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: is {workdir} a wake2vec training workdir?")
    config = json.loads(config_path.read_text())
    try:
        base_vocab_size = int(config["vocab"]["base_size"])
    except (KeyError, TypeError) as error:
        raise KeyError(f"{config_path} has no vocab.base_size; use --post/--pre/--base_vocab_size instead") from error
    pre_path = workdir / "embeddings_pre.npy"
    if not pre_path.is_file():
        raise FileNotFoundError(f"{pre_path} not found: drift needs the pre-training snapshot. To analyse without "
                                "drift, export the table and use --post (without --pre)")
    from wake2vec import checkpoint  # pulls in JAX and Orbax; only this mode needs them

    E_post, loaded_step = checkpoint.load_table(workdir, step=step)  # padding rows already cut
    E_pre = load_table(pre_path)
    if E_pre.shape != E_post.shape:
        raise ValueError(f"{pre_path} has shape {E_pre.shape} but the step-{loaded_step} table has {E_post.shape}")
    tokenizer_dir = workdir / "tokenizer"
    tokens = None
    if tokenizer_dir.is_dir():
        tokens = load_id_to_token(tokenizer_dir, E_post.shape[0])
    else:
        logging.warning("%s not found: token names will be null", tokenizer_dir)
    out_dir = pathlib.Path(out_dir) if out_dir is not None else workdir / "analysis"
    source = {"workdir": str(workdir), "step": int(loaded_step)}
    return report.run_analysis(E_post, base_vocab_size, out_dir, E_pre=E_pre, tokens=tokens, seed=seed, source=source,
                               pairs_file=pairs_file)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if (FLAGS.workdir is None) == (FLAGS.post is None):
        raise app.UsageError("give exactly one of --workdir or --post")
    if FLAGS.workdir is not None:
        summary = analyze_workdir(FLAGS.workdir, step=FLAGS.step, out_dir=FLAGS.out_dir, seed=FLAGS.seed,
                                  pairs_file=FLAGS.pairs)
    else:
        if FLAGS.base_vocab_size is None:
            raise app.UsageError("--post needs --base_vocab_size (rows [:N] are the base vocabulary)")
        summary = analyze_files(FLAGS.post, FLAGS.base_vocab_size, FLAGS.out_dir, pre_path=FLAGS.pre,
                                tokenizer_dir=FLAGS.tokenizer, seed=FLAGS.seed, pairs_file=FLAGS.pairs)
    logging.info("analysis written: %s", summary["meta"]["source"])
    logging.info("%s", source_rank.headline(summary))
    if FLAGS.workdir is not None:
        logging.info("%s", report.generation_usage_headline(FLAGS.workdir))


if __name__ == "__main__":
    define_flags()
    app.run(main)
