r"""Phase 2: LoRA adapters on the frozen body, over the frozen table of a Phase 1 run.

    python -m experiments.train_p2                          # after the demo: runs/demo -> runs/demo_p2
    python -m experiments.train_p2 --phase1=runs/tinyllama --workdir=runs/tinyllama_p2

It trains and validates on the Phase 1 run's own blocks, from its best-validation table
(--phase1_step), and writes only the adapters and their optimiser state to checkpoints.
Every flag is a field of wake2vec.config.Phase2Config (defaults: the study's recipe);
`--flagfile` works. Running the same command on the same workdir resumes.
"""

from __future__ import annotations

from wake2vec import launcher
from wake2vec.config import Phase2Config


def demo_preset(cfg: Phase2Config, explicitly_set: set[str]) -> Phase2Config:
    from wake2vec.phases import phase2

    return phase2.demo_preset(cfg, explicitly_set)


def run(cfg: Phase2Config) -> str:
    # Imported here, so --help answers before JAX, Orbax and transformers load.
    from wake2vec.phases import phase2

    result = phase2.run(cfg)
    return f"done: {result.workdir} at step {result.final_step}"


if __name__ == "__main__":
    launcher.launch(Phase2Config, run, __doc__, adjust=demo_preset)
