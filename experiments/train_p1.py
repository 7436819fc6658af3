r"""Phase 1: inject a lexicon, train only the embedding table, analyse what moved.

    python -m experiments.train_p1                       # the embedded demo -> runs/demo
    python -m experiments.train_p1 --workdir=runs/tinyllama \
        --model=TinyLlama/TinyLlama-1.1B-Chat-v1.0 \
        --corpus=finnegans_wake.txt --lexicon=wake_lexicon.txt --start_marker=riverrun

Every flag is a field of wake2vec.config.TrainConfig (defaults: the reference run's
recipe); `--flagfile` works. Running the same command on the same workdir resumes from its
latest committed checkpoint.
"""

from __future__ import annotations

from wake2vec import launcher
from wake2vec.config import DEMO_SOURCE, TrainConfig


def demo_preset(cfg: TrainConfig, explicitly_set: set[str]) -> TrainConfig:
    """The embedded demo's schedule for every flag the user did not set."""
    if cfg.model != DEMO_SOURCE:
        return cfg
    from wake2vec import demo

    return demo.apply_preset(cfg, explicitly_set)


def run(cfg: TrainConfig) -> str:
    # Imported here, so --help answers before JAX, Orbax and transformers load.
    from wake2vec.training import loop

    result = loop.run(cfg)
    return f"done: {result.workdir} at step {result.final_step}"


if __name__ == "__main__":
    launcher.launch(TrainConfig, run, __doc__, adjust=demo_preset)
