"""Phase 1: inject a lexicon, train only the embedding table, analyse what moved.

    python -m experiments.train_p1                       # the embedded demo -> runs/demo
    python -m experiments.train_p1 --workdir=runs/tinyllama \
        --model=TinyLlama/TinyLlama-1.1B-Chat-v1.0 \
        --corpus=finnegans_wake.txt --lexicon=wake_lexicon.txt --start_marker=riverrun

Every flag is a field of wake2vec.config.TrainConfig (defaults: the reference run's
recipe); `--flagfile` works. Running the same command on the same workdir resumes from its
latest committed checkpoint.
"""

from __future__ import annotations

import logging
import sys

from absl import app
from absl import logging as absl_logging

from wake2vec import demo, flags as config_flags, loop
from wake2vec.config import DEMO_SOURCE, TrainConfig

config_flags.define_flags(TrainConfig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
    cfg = config_flags.config_from_flags(TrainConfig)
    if cfg.model == DEMO_SOURCE:
        cfg = demo.apply_preset(cfg, config_flags.explicitly_set(TrainConfig))
    logging.getLogger().setLevel(logging.INFO)
    # Orbax narrates every save at INFO; keep the user's console for progress and warnings.
    absl_logging.get_absl_handler().addFilter(lambda r: r.levelno >= logging.WARNING or "/orbax/" not in r.pathname)
    try:
        result = loop.run(cfg)
    except (ValueError, RuntimeError, OSError) as e:
        # Errors here are the user's to act on (bad input, a changed source, a full disk):
        # one clear line and a non-zero exit, not a traceback.
        logging.error("%s: %s", type(e).__name__, e)
        sys.exit(1)
    print(f"done: {result.workdir} at step {result.final_step}")


if __name__ == "__main__":
    app.run(main)
