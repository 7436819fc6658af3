r"""Phase 3: a Phase 2 run's adapters and the Wake rows, under the LM loss plus the alignment terms.

    python -m experiments.train_p3                          # after the demo's Phase 2: runs/demo_p2 -> runs/demo_p3
    python -m experiments.train_p3 --phase2=runs/tinyllama_p2 --workdir=runs/tinyllama_p3 \
        --morpheme_groups=morphemes.jsonl --device_groups=devices.jsonl

Without --morpheme_groups it builds affix groups from the lexicon and the base vocabulary
(experiments.build_groups does the same on its own). The validation loss is the LM loss
alone; each alignment term is logged apart. Every flag is a field of
wake2vec.config.Phase3Config; `--flagfile` works; rerunning the same command resumes.
"""

from __future__ import annotations

from wake2vec import launcher
from wake2vec.config import Phase3Config


def demo_preset(cfg: Phase3Config, explicitly_set: set[str]) -> Phase3Config:
    from wake2vec.phases import phase3

    return phase3.demo_preset(cfg, explicitly_set)


def run(cfg: Phase3Config) -> str:
    # Imported here, so --help answers before JAX, Orbax and transformers load.
    from wake2vec.phases import phase3

    result = phase3.run(cfg)
    return f"done: {result.workdir} at step {result.final_step}"


if __name__ == "__main__":
    launcher.launch(Phase3Config, run, __doc__, adjust=demo_preset)
